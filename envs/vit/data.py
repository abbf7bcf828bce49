"""Data sets by name, with explicit, reproducible train / val / test splits.

Every command in the project reads images through :func:`load_split`:

- ``train``: the training split minus a fixed, seeded validation subset. Backbone training and
  PPO training use it.
- ``val``: that held-out subset of the training split. Model selection (best backbone epoch, best
  policy checkpoint) uses it.
- ``test``: the data set's own test split. Only final evaluation (``evaluate.py``, the backbone's
  model card) reads it.

Data sets:

- ``cifar10`` / ``cifar100``: ``<data-dir>/<name>/{train,test}.tar`` or ``{train,test}/`` in ImageFolder
  layout (the layout of the shared JPEG copy), else torchvision's own files under
  ``<data-dir>/<name>``, downloaded when ``download=True`` and the network is reachable.
- ``folder``: any ImageFolder directory (or ``.tar`` of one) with ``train`` and ``test`` (or ``val``)
  children, ImageNet-style, at ``<data-dir>``.

Images are decoded once into a ``uint8`` tensor ``[N, 3, H, W]`` at the model's input size, so that
training, the ViT server and evaluation index images instead of re-reading files, unless the split would
take more than ``memory_budget_mb``: then the split streams (:class:`StreamedImages`), decoding the same
pixels from the files on demand, and :meth:`ImageSplit.batches` reads ahead with DataLoader workers.

Whether a backbone can be scored on a split is checked by :mod:`envs.vit.held_out` (no image it trained on, the
class count of a data set known by name), which reads splits through this module; :func:`load_split` compares the
classes themselves (:func:`check_classes`) before it decodes a split.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tarfile
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from timm.data import ImageDataset, create_dataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

from envs.atomic_file import first_missing
from envs.errors import UserError

DATASETS = ("cifar10", "cifar100", "folder")
SPLITS = ("train", "val", "test")
DEFAULT_VAL_SIZE = 5000
DEFAULT_SPLIT_SEED = 0
DATA_DIR_ENV = "MARL_PRUNING_DATA_DIR"
DEFAULT_MEMORY_BUDGET_MB = 4096.0  # decoded splits up to this size stay in memory (CIFAR-10's train split: 132 MiB)
FINGERPRINT_IMAGES = 64  # validation images whose colours identify the split a backbone held out
ARCHIVE_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".zip", ".7z")  # compressed splits, which are not read
BATCH_WORKERS = 2  # processes decoding a streamed split ahead of the caller of ImageSplit.batches


class DataError(UserError, RuntimeError):
    """A data set that cannot be found or read; the message is meant for the user as is."""


class ClassesDiffer(DataError):
    """A data set whose classes are not those of the backbone it is read for (:func:`check_classes`)."""


class UnreadableImage(DataError):
    """An image file that does not decode (:func:`unreadable_image`). It takes its message alone, as every
    exception a DataLoader worker re-raises in the caller must."""

    path: Path
    reason: str


def unreadable_image(path: Path, reason: str) -> UnreadableImage:
    """The error for the image at ``path`` (in its split's directory or tar) that PIL cannot decode, for ``reason``."""
    error = UnreadableImage(f"cannot read image {path}: {reason} (replace it with a readable image: removing it "
                            f"renumbers the images after it, and with them the splits)")
    error.path, error.reason = path, reason
    return error


class StreamedImages(torch.utils.data.Dataset):
    """A split's images read from their files on demand. ``images[i]`` is uint8 ``[3, S, S]`` and
    ``images[indices]`` uint8 ``[n, 3, S, S]``, the same pixels as the decoded tensor would hold.

    :meth:`prefetch` decodes images a caller will ask for next in a background thread. That thread is the
    only one that reads the files (lookups of other images queue there too), because the data set readers
    (a tar file, say) are not safe to share across threads. ``open_raw`` opens the data set; each process
    opens its own, so the object pickles (to a Ray actor, a DataLoader worker) without open files. The
    workers of :meth:`loader`, forked, take the data set it opened instead.
    """

    PREFETCHED_LIMIT = 4096  # prefetched images kept waiting at most; the oldest are dropped first

    def __init__(self, open_raw: Callable[[], Any], indices: np.ndarray, input_size: int) -> None:
        self.open_raw, self.indices, self.input_size = open_raw, indices, input_size
        self._raw = None
        self._pending: dict[int, Future] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._reader_pid = 0
        self._for_workers, self._for_workers_pid = None, 0  # the data set :meth:`loader` opened, never read here

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_raw": None, "_pending": {}, "_reader": None, "_reader_pid": 0,
                "_for_workers": None, "_for_workers_pid": 0}

    def loader(self, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader over these images (``kwargs``: its settings). Its worker processes, where they are
        forked, inherit a data set opened here once, instead of each opening it again at every epoch: opening
        reads the index of the files, every member header of a tar (about a minute for ImageNet's train split on
        a 2-core CPU). Nothing reads through that one here, so the files it opens are each worker's own. Workers
        started otherwise (spawn, forkserver) receive the images pickled, without it, and open their own."""
        context = kwargs.get("multiprocessing_context") or torch.multiprocessing.get_context()
        forked = (context if isinstance(context, str) else context.get_start_method()) == "fork"
        opened_here = self._for_workers is not None and self._for_workers_pid == os.getpid()
        if kwargs.get("num_workers", 0) > 0 and forked and not opened_here:
            self._for_workers, self._for_workers_pid = self.open_raw(), os.getpid()
        return torch.utils.data.DataLoader(self, **kwargs)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(index, int | np.integer):
            return self[[int(index)]][0]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        futures = [self._pending.pop(int(row), None) or self._read(int(row)) for row in rows.reshape(-1)]
        if not futures:
            return torch.empty((0, 3, self.input_size, self.input_size), dtype=torch.uint8)
        return torch.cat([future.result() for future in futures])

    def prefetch(self, rows: Sequence[int]) -> None:
        """Start decoding these images now, so that a later ``images[rows]`` finds them ready."""
        for row in rows:
            if int(row) not in self._pending:
                self._pending[int(row)] = self._read(int(row))
        while len(self._pending) > self.PREFETCHED_LIMIT:
            self._pending.pop(next(iter(self._pending)))

    def _read(self, row: int) -> Future:
        if self._reader is None or self._reader_pid != os.getpid():  # a forked process has no reader thread
            forked_by_loader = self._for_workers is not None and self._for_workers_pid != os.getpid()
            self._raw = self._for_workers if forked_by_loader else None
            self._reader, self._reader_pid, self._pending = ThreadPoolExecutor(max_workers=1), os.getpid(), {}
        return self._reader.submit(self._decode_row, row)

    def _decode_row(self, row: int) -> torch.Tensor:
        """In the reader thread: one image ``[1, 3, S, S]``."""
        if self._raw is None:
            self._raw = self.open_raw()
        return _decode(self._raw, self.indices[[row]], self.input_size)


@dataclass(frozen=True)
class ImageSplit:
    """A split: images as uint8 ``[N, 3, H, W]`` (a tensor, or :class:`StreamedImages` indexed alike), labels
    as int64 ``[N]``; ``file_indices`` ``[N]``, each image's index in the data set's file it was read from (the
    test set's for ``test``, the training set's for ``train`` and ``val``), which names an image whatever
    ``limit`` or validation size chose it (None for images that were not read by :func:`load_split`)."""

    images: torch.Tensor | StreamedImages
    labels: torch.Tensor
    class_names: tuple[str, ...]
    file_indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images in order, ``batch_size`` at a time; a streamed split decodes ahead in :data:`BATCH_WORKERS`
        processes while the caller computes."""
        if isinstance(self.images, torch.Tensor):
            yield from self.images.split(batch_size)
            return
        with errors_of_workers():
            yield from self.images.loader(batch_size=batch_size, num_workers=BATCH_WORKERS)


@contextlib.contextmanager
def errors_of_workers() -> Iterator[None]:
    """A DataError raised in a DataLoader worker (an unreadable image) reaches the caller as a DataError whose
    message is the worker's traceback; this gives it back its own one-line message."""
    try:
        yield
    except DataError as error:
        kind = type(error)
        # Its traceback holds the DataLoader's iterator, in a reference cycle: dropped, the iterator stops its
        # workers at once. Left to the garbage collector, which closes the iterator's queues before the iterator
        # can ask the workers to stop, the iterator would wait 5 s for each worker and then kill it.
        error.__traceback__ = None
        raise kind(str(error).strip().splitlines()[-1].split(f"{kind.__name__}: ", 1)[-1]) from None


def absolute_data_dir(data_dir: str) -> str:
    """``data_dir`` as a run records it and reads it: absolute, from the working directory, so that train.py's
    trials (each runs in a directory of its own) and a run resumed from another directory read the same data."""
    return str(Path(data_dir).expanduser().resolve())


def check_recorded_data_dir(data_dir: str) -> None:
    """A DataError where the data directory a run recorded, which its ``--resume`` reads, is gone (moved, or on
    another machine)."""
    if not Path(data_dir).expanduser().exists():
        raise DataError(f"--resume: the run's data directory {data_dir} does not exist: pass --data-dir where its "
                        f"data is now (the run reads the directory it recorded, whatever {DATA_DIR_ENV} says)")


def default_data_dir() -> str:
    """``$MARL_PRUNING_DATA_DIR`` when set, else ``./data``. Set empty (``export MARL_PRUNING_DATA_DIR=$DATA`` with
    ``DATA`` unset) it counts as unset, as the shell's own ``${VAR:-default}`` does: not the current directory."""
    return os.environ.get(DATA_DIR_ENV) or "data"


def _split_names(split: str) -> tuple[str, ...]:
    """The names a ``train`` or ``test`` split's directory or tar may have, in the order they are looked for."""
    return ("train",) if split == "train" else ("test", "val", "validation")


def _dataset_directory(dataset: str, data_dir: Path) -> Path:
    """Where a data set's splits are looked for: ``data_dir`` itself for ``folder``, else ``data_dir/<dataset>``."""
    return data_dir if dataset == "folder" else data_dir / dataset


def _split_source(dataset: str, data_dir: Path, split: str) -> Path | None:
    """The ImageFolder directory or tar holding a train/test split, or None if absent."""
    base = _dataset_directory(dataset, data_dir)
    for name in _split_names(split):
        for candidate in (base / f"{name}.tar", base / name):
            if candidate.exists():
                return candidate
    return None


def _data_root(dataset: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    """The data directory: ``data_dir``, else :func:`default_data_dir`; a DataError if it is missing and nothing
    will be downloaded into it."""
    root = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    if not root.exists() and not (download and dataset != "folder"):
        raise DataError(f"data directory {root} does not exist: {_where_to_put_it(dataset, root)}")
    if root.exists() and not root.is_dir():
        raise DataError(f"data directory {root} is a file, not a directory: {_where_to_put_it(dataset, root)}"
                        f"{_split_given(root) if dataset == 'folder' else ''}")
    return root


def _where_to_put_it(dataset: str, data_dir: Path) -> str:
    """The layout a data set is looked for in and how to point the commands at it, for error messages."""
    base = _dataset_directory(dataset, data_dir)
    layout = f"{base}/train.tar and {base}/test.tar, or train/ and test/ ImageFolder directories"
    if dataset != "folder":
        layout += ", or torchvision's files"
    return f"expected {layout}; pass --data-dir DIR (data_dir= in Python) or set {DATA_DIR_ENV}"


def _names_split(name: str, splits: tuple[str, ...] = ("train", "test")) -> bool:
    """Whether a file or directory ``name`` is that of one of ``splits``, in any case, a directory or a ``.tar``."""
    return any(name.lower().removesuffix(".tar") in _split_names(split) for split in splits)


def _split_given(data_dir: Path) -> str:
    """The hint for a data directory that is a split itself (``train/`` or ``train.tar``), else ''."""
    if _names_split(data_dir.name):
        return f" ({data_dir} looks like a split itself: pass the directory above it, --data-dir {data_dir.parent})"
    return ""


def _layout_hint(data_dir: Path, split: str) -> str:
    """What an ImageFolder data directory without ``split`` looks like instead, for the error that says so: a split
    given itself, the split's folder named in another case (``Train/``: split folders are looked for in lower case,
    and a case-sensitive file system does not find ``train/`` so; every split folder so named is listed, to rename
    them at once), the split in a compressed archive (timm reads a ``.tar`` only: it would take ``train.tar.gz`` for
    a directory), or class folders with no split above them."""
    given = _split_given(data_dir)
    if given:
        return given
    other_case = sorted(child.name for child in data_dir.iterdir()
                        if child.name != child.name.lower() and _names_split(child.name))
    if any(_names_split(name, (split,)) for name in other_case):
        renames = ", ".join(f"{name} to {name.lower()}" for name in other_case)
        return f" (split folders are looked for in lower case: rename {renames} in {data_dir})"
    packed = sorted(child.name for child in data_dir.iterdir()
                    if child.name.partition(".")[0] in _split_names(split) and child.suffix.lower() in ARCHIVE_SUFFIXES)
    if packed:
        name = packed[0].partition(".")[0]
        return (f" ({data_dir / packed[0]} is compressed, and only an uncompressed .tar is read: unpack it into "
                f"{data_dir / name}/ or decompress it into {data_dir / name}.tar)")
    read = get_img_extensions(as_set=True)
    if any(child.is_dir() and any(path.suffix.lower() in read for path in child.iterdir())
           for child in data_dir.iterdir()):
        return f" ({data_dir} holds class folders: move them into {data_dir}/train/, and a test split's into test/)"
    return ""


def _open_raw_split(dataset: str, data_dir: Path, split: str, download: bool):
    """A timm / torchvision dataset over the raw ``train`` or ``test`` split (PIL image, int label)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    source = _split_source(dataset, data_dir, split)
    if source is not None:
        # timm raises RuntimeError ("Found 0 images in subfolders"), OSError (unreadable files), TarError (a cut
        # tar) or ValueError (a tar without images)
        try:
            raw = create_dataset("", root=str(source))
            classes = _class_names(raw)
            # timm numbers the classes in a natural sort that ignores case, and those it ties ('Cat' and 'cat',
            # 'class1' and 'class01') in the order of a set of strings, which differs from process to process
            order = sorted(classes, key=lambda name: (natural_key(name), name))
            if list(classes) != order:
                raw = create_dataset("", root=str(source), class_map={name: i for i, name in enumerate(order)})
        except (RuntimeError, OSError, ValueError, tarfile.TarError) as error:
            raise DataError(f"cannot read {source}: {error}") from None
        return raw
    if dataset == "folder":
        raise DataError(f"no '{split}' split in {data_dir}: {_where_to_put_it(dataset, data_dir)}"
                        f"{_layout_hint(data_dir, split)}")
    image_folder = _split_source("folder", data_dir, split)
    if image_folder is not None and data_dir.name == dataset:  # the data set's own directory given
        raise DataError(f"{dataset} not found in {data_dir}, which looks like {dataset}'s own directory: pass the "
                        f"directory above it, --data-dir {data_dir.parent}")
    if image_folder is not None and not (data_dir / dataset).exists():
        # one's own data under the default --dataset (or a backbone's): not a download into it
        raise DataError(f"{dataset} not found in {data_dir}, which holds an ImageFolder data set ({image_folder}): "
                        f"pass --dataset folder (train.py and evaluate.py read their --backbone's data set), or "
                        f"another --data-dir for {dataset}")
    # what a download creates: removed again if it fails, so a failed command leaves nothing behind
    created = first_missing(data_dir / dataset)
    try:
        return create_dataset(f"torch/{dataset}", root=str(data_dir / dataset), split=split, download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted", download=False
        raise DataError(f"{dataset} not found in {data_dir}: {_where_to_put_it(dataset, data_dir)}") from None
    except OSError as error:  # offline download attempt
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(f"{dataset} not found in {data_dir} and could not be downloaded ({error}): "
                        f"{_where_to_put_it(dataset, data_dir)}") from None


_SHARED_RAW_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _shared_raw_split(dataset: str, data_dir: Path, split: str, download: bool, cwd: Path):
    """:func:`_open_raw_split`, opened once per process: indexing a tar reads every member's header (about 5 s
    for CIFAR-10's train.tar on a 2-core CPU), and ``train`` and ``val`` are two cuts of the same file. ``cwd``
    is only part of the key (a relative ``data_dir`` names another directory after a chdir). Readers are not
    safe to share across threads, so it is read through :func:`_held_raw_split`, and :class:`StreamedImages`
    opens a reader of its own. An ImageFolder's layout is checked here (:func:`_check_layout`), where this process
    indexes it, not again in each reader."""
    raw = _open_raw_split(dataset, data_dir, split, download)
    if isinstance(raw, ImageDataset):
        _check_layout(raw)
    return raw


@contextlib.contextmanager
def _held_raw_split(dataset: str, root: Path, split: str, download: bool) -> Iterator[Any]:
    """This process's :func:`_shared_raw_split` of the data set at ``root`` (:func:`_data_root`), held under
    ``_SHARED_RAW_LOCK`` while the caller reads it."""
    with _SHARED_RAW_LOCK:
        yield _shared_raw_split(dataset, root, split, download, Path.cwd())


def _check_layout(raw: ImageDataset) -> None:
    """A DataError for an ImageFolder (a directory or a tar of one) whose images are not each in a class folder,
    of two classes at least, or of which an image file is hidden, or for a class directory without images: timm
    labels an image by its innermost folder, so ``cat/2019/`` would be a class ``2019`` of its own, shared by every
    class that holds such a folder; hidden files (macOS ``._`` copies, Jupyter's ``.ipynb_checkpoints/``) would be
    read as images; and timm numbers the classes that hold images only, so an empty ``ship/`` would leave the class
    out of this split (of the model, where every split lacks it) instead of saying so. A warning names the files of
    image formats that are skipped (timm reads PNG and JPEG only). A tar is indexed by timm as a stream of its
    images, which keeps no directory, so an empty class folder is seen in a directory only."""
    source = Path(raw.reader.root)
    in_directory = source.is_dir()
    for name in raw.reader.filenames(basename=False, absolute=False):
        parts = [part for part in name.replace(os.sep, "/").split("/") if part not in ("", ".")]  # a tar's: '/'
        if any(part.startswith(".") for part in parts):
            raise DataError(f"{source / name} is hidden (a name that starts with '.') and would be read as an image "
                            f"of the data set: delete it")
        if in_directory and len(parts) > 2:
            raise DataError(f"{source / name} is in a folder inside a class folder, which would be a class of its own "
                            f"({parts[-2]!r}): keep each class's images in {source}/<class>/ itself")
    if in_directory:
        read, known = get_img_extensions(as_set=True), Image.registered_extensions()
        suffixes = {folder.path: {os.path.splitext(entry.name)[1].lower() for entry in os.scandir(folder.path)
                                  if not entry.name.startswith(".") and entry.is_file()}
                    for folder in os.scandir(source) if folder.is_dir() and not folder.name.startswith(".")}
        empty = sorted(folder for folder, found in suffixes.items() if not found & read)
        if empty:
            raise DataError(f"class folder {empty[0]} holds no images (PNG or JPEG), so its class would be left out: "
                            f"put the class's images in it, or remove the class from every split")
        skipped = sorted({suffix for found in suffixes.values() for suffix in found if suffix in known
                          and suffix not in read})
        if skipped:
            warnings.warn(f"{source} holds images in formats that are not read, skipped ({', '.join(skipped)}): "
                          f"convert them to PNG or JPEG to use them", stacklevel=2)
    classes = _class_names(raw)
    if "" in classes or "." in classes or len(classes) < 2:
        raise DataError(f"{source} holds images outside class folders, or one class only "
                        f"({', '.join(map(repr, classes))}): an ImageFolder keeps each class's images in a "
                        f"folder of its own ({source}/<class>/<image>), two classes at least")


def _class_names(raw) -> tuple[str, ...]:
    if hasattr(raw, "classes"):  # torchvision
        return tuple(raw.classes)
    reader = raw.reader  # timm: a tar (class_name_to_idx) or a directory (class_to_idx)
    mapping = getattr(reader, "class_name_to_idx", None) or reader.class_to_idx
    return tuple(sorted(mapping, key=mapping.get))


def _labels(raw) -> np.ndarray:
    if hasattr(raw, "targets"):  # torchvision
        return np.asarray(raw.targets, dtype=np.int64)
    reader = raw.reader  # timm: a tar (targets) or a directory (samples of (path, target))
    targets = reader.targets if hasattr(reader, "targets") else [target for _, target in reader.samples]
    return np.asarray(targets, dtype=np.int64)


def _file_split(split: str) -> str:
    """The data set's own split a split is read from: ``val`` is cut from ``train``."""
    return "test" if split == "test" else "train"


def split_class_names(dataset: str, split: str, data_dir: str | os.PathLike | None = None,
                      download: bool = False) -> tuple[str, ...]:
    """The class names of a split in label order, without decoding its images (``backbone.py`` checks the test
    split's before it trains)."""
    with _held_raw_split(dataset, _data_root(dataset, data_dir, download), _file_split(split), download) as raw:
        return _class_names(raw)


def class_difference(found: Sequence[str], expected: Sequence[str], found_in: str, expected_in: str) -> str:
    """What tells two lists of class names apart, for an error message: the classes that each of ``found_in`` and
    ``expected_in`` (what holds ``found`` and ``expected``: ``"the test split"``) has and the other lacks (``ascii``,
    so that names that differ only in their Unicode form show it), or their order."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if not missing and not unexpected:
        return "the same classes in another order"
    parts = [f"{holder} has class{'es' if len(names) > 1 else ''} {', '.join(map(ascii, names[:5]))}"
             + (f" and {len(names) - 5} more" if len(names) > 5 else "") + f" that {other} lacks"
             for holder, other, names in ((expected_in, found_in, missing), (found_in, expected_in, unexpected))
             if names]
    if ({unicodedata.normalize("NFC", name) for name in missing}
            & {unicodedata.normalize("NFC", name) for name in unexpected}):
        parts.append("some are the same names in another Unicode form (macOS writes file names decomposed, NFD)")
    return "; ".join(parts)


def split_indices(labels: np.ndarray, split: str, val_size: int, seed: int) -> np.ndarray:
    """Indices into the raw training split (``labels [N]`` in its file order) for ``train`` or ``val``: a seeded
    permutation, cut once, of the images in class order (a stable sort by label). Counting in class order makes
    the split independent of how a copy interleaves its classes: an ImageFolder copy lists each class's images
    together, torchvision's CIFAR files mix them, and both give the same split where each class keeps its order
    (:func:`envs.vit.held_out.check_fits_backbone` tells when a copy does not)."""
    num_train = len(labels)
    if not 0 < val_size < num_train:
        raise DataError(f"validation size {val_size} must be between 1 and {num_train - 1}, the data set's "
                        f"{num_train} training images less one (backbone.py's and train.py's --val-size)")
    order = np.argsort(labels, kind="stable")[np.random.default_rng(seed).permutation(num_train)]
    chosen = order[:val_size] if split == "val" else order[val_size:]
    return np.sort(chosen)


def limited_positions(size: int, limit: int, seed: int) -> np.ndarray:
    """The positions, ascending, of the seeded subset of ``limit`` images that :func:`load_split` keeps of a split
    of ``size`` images when given ``limit`` (all of them when ``limit >= size``). A script that needs the images
    a limited split did *not* hold (those train.py did not rank checkpoints by, say) takes the others."""
    if limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=limit, replace=False))


def held_out_fingerprint(dataset: str, data_dir: str | os.PathLike | None, input_size: int, val_size: int, seed: int,
                         download: bool = False) -> list[list[float]]:
    """The mean of each colour channel, 0-255, of the first :data:`FINGERPRINT_IMAGES` images of a data set's
    validation split, ``[FINGERPRINT_IMAGES, 3]``. ``backbone.py`` records it beside the split's seed and size,
    and :func:`envs.vit.held_out.check_fits_backbone` compares it: a copy of the data set with other files or in
    another order would draw other images under the same seed, images the backbone may have trained on. Channel
    means name the images yet survive re-encoding (a JPEG copy of CIFAR against the original pixels)."""
    with _held_raw_split(dataset, _data_root(dataset, data_dir, download), "train", download) as raw:
        indices = split_indices(_labels(raw), "val", val_size, seed)[:FINGERPRINT_IMAGES]
        images = _decode(raw, indices, input_size)
    return [[round(value, 2) for value in image] for image in images.float().mean(dim=(2, 3)).tolist()]


def training_split_size(dataset: str, data_dir: str | os.PathLike | None, download: bool = False) -> int:
    """The images in a data set's training split, the validation images among them: the seed that holds out the
    validation split (:func:`split_indices`) draws other images from another count. ``backbone.py`` records it
    (``val_drawn_from``) and :func:`envs.vit.held_out.check_fits_backbone` compares it."""
    with _held_raw_split(dataset, _data_root(dataset, data_dir, download), "train", download) as raw:
        return len(raw)


def check_classes(found: Sequence[str], backbone_config: Mapping[str, Any]) -> None:
    """Raise a DataError naming the difference where a data set's classes ``found`` are not those the backbone of
    ``backbone_config`` was trained on: its answers would be compared with other labels."""
    classes = tuple(backbone_config.get("class_names") or ())
    if (classes and classes != tuple(found)) or len(found) != backbone_config["num_classes"]:
        difference = (class_difference(found, classes, "the data set", "the backbone") if classes
                      else "unnamed in the backbone")
        raise ClassesDiffer(f"the data set's {len(found)} classes are not the backbone's "
                            f"{backbone_config['num_classes']} ({difference})")


def _image(raw, index: int) -> Image.Image:
    """The data set's image ``index``, decoded. An unreadable file is a DataError naming it: timm's
    ``ImageDataset.__getitem__`` would log it and return the next file's image, which then takes this one's label.
    So is an image of more pixels than PIL opens (``Image.MAX_IMAGE_PIXELS`` twice over: a decompression bomb)."""
    if not isinstance(raw, ImageDataset):  # torchvision: arrays in memory
        image, _ = raw[index]
        return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    try:
        file, *_ = raw.reader[index]  # a directory's reader opens the file: a broken link, say, fails here
        image = Image.open(file)
        image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise unreadable_image(Path(raw.reader.root) / raw.filename(index), str(error)) from None
    return image


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB. PIL's ``convert("RGB")`` clips a 16-bit grey image's levels to 255 (a 16-bit PNG
    turns white): they are scaled to 8 bits first."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says. A camera or phone stores a photo taken sideways as the
    sensor read it and tags how to turn it for display; every viewer does, and the model should see what the user
    sees (PIL, torchvision's and timm's data sets leave it sideways)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def fit_image(image: Image.Image, input_size: int) -> torch.Tensor:
    """``image`` as every split decodes its images for a backbone of ``input_size``: uint8 RGB ``[3, S, S]``,
    upright (:func:`upright`), its short side resized to S (bicubic) and centre-cropped (a no-op for CIFAR), so
    that its shapes keep their proportions."""
    image = _rgb(upright(image))
    if image.size != (input_size, input_size):
        scale = input_size / min(image.size)
        width, height = (max(input_size, round(s * scale)) for s in image.size)
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - input_size) // 2, (height - input_size) // 2
        image = image.crop((left, top, left + input_size, top + input_size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


UNREADABLE_NAMED = 5
"""How many unreadable images one error names (it counts the rest)."""


def _decode(raw, indices: np.ndarray, input_size: int) -> torch.Tensor:
    """Decode images to uint8 ``[N, 3, S, S]`` (:func:`fit_image`). Every image is tried before unreadable ones are
    reported, in one error, so that one run finds them all."""
    out = torch.empty((len(indices), 3, input_size, input_size), dtype=torch.uint8)
    unreadable: list[UnreadableImage] = []
    for row, index in enumerate(indices):
        try:
            out[row] = fit_image(_image(raw, int(index)), input_size)
        except UnreadableImage as error:
            unreadable.append(error)
    if len(unreadable) == 1:
        raise unreadable[0]
    if unreadable:
        named = "; ".join(f"{error.path} ({error.reason})" for error in unreadable[:UNREADABLE_NAMED])
        more = f"; and {len(unreadable) - UNREADABLE_NAMED} more" if len(unreadable) > UNREADABLE_NAMED else ""
        raise DataError(f"cannot read {len(unreadable)} images: {named}{more} (replace them with readable images: "
                        f"removing them renumbers the images after them, and with them the splits)")
    return out


def load_split(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    input_size: int = 32,
    val_size: int = DEFAULT_VAL_SIZE,
    seed: int = DEFAULT_SPLIT_SEED,
    limit: int | None = None,
    download: bool = False,
    memory_budget_mb: float | None = None,
    backbone_config: Mapping[str, Any] | None = None,
) -> ImageSplit:
    """One split of a data set, decoded into memory or, above ``memory_budget_mb``, streamed from its files
    (see the module docstring for the splits).

    ``limit`` keeps a seeded random subset of ``limit`` images of the split (for quick looks and tests);
    the split itself never changes with it. ``memory_budget_mb=None``: :data:`DEFAULT_MEMORY_BUDGET_MB`.
    ``backbone_config``: a data set of other classes than this backbone's is refused (:func:`check_classes`)
    before it is split or decoded.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = _data_root(dataset, data_dir, download)
    raw_split = _file_split(split)
    with _held_raw_split(dataset, root, raw_split, download) as raw:
        labels = _labels(raw)
        if backbone_config is not None:
            check_classes(_class_names(raw), backbone_config)
        if split == "test":
            indices = np.arange(len(labels))
        else:
            indices = split_indices(labels, split, val_size, seed)
        if limit is not None and limit < len(indices):
            indices = indices[limited_positions(len(indices), limit, seed)]
        decoded_mb = len(indices) * 3 * input_size * input_size / 2**20
        budget_mb = DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb
        images = (_decode(raw, indices, input_size) if decoded_mb <= budget_mb
                  else StreamedImages(functools.partial(_open_raw_split, dataset, root, raw_split, False), indices,
                                      input_size))
        return ImageSplit(images, torch.from_numpy(labels[indices]), _class_names(raw), indices)
