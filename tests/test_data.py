"""The data module: split sizes and labels on the shared CIFAR-10 copy, and clear errors."""

import functools
import multiprocessing
import os
import pickle
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps

from envs.pruning_engine import PruningEngine
from envs.pruning_env import TokenPruningEnv
from envs.vit import data
from envs.vit.data import (
    DATA_DIR_ENV,
    DEFAULT_SPLIT_SEED,
    DataError,
    ImageSplit,
    StreamedImages,
    class_difference,
    limited_positions,
    load_split,
    split_class_names,
    split_indices,
)
from envs.vit.held_out import check_fits_backbone, load_checked_split
from envs.vit.staged_vit import StagedViT


def test_val_split_is_seeded_and_disjoint_from_train():
    labels = np.repeat(np.arange(10), 100)
    train = split_indices(labels, "train", 100, seed=0)
    val = split_indices(labels, "val", 100, seed=0)
    assert len(train) == 900 and len(val) == 100
    assert not set(train) & set(val)
    assert np.array_equal(val, split_indices(labels, "val", 100, seed=0))
    assert not np.array_equal(val, split_indices(labels, "val", 100, seed=1))


def test_a_copy_that_interleaves_the_classes_splits_the_same_images():
    """An ImageFolder copy lists each class together, torchvision's CIFAR files mix the classes: where each class
    keeps its order, both copies hold out the same images."""
    by_class = np.repeat(np.arange(3), 10)  # image ids 0..29, class by class
    mixed = np.arange(30).reshape(3, 10).T.reshape(-1)  # ids in the order 0, 10, 20, 1, 11, 21, ...
    for split in ("train", "val"):
        assert (set(mixed[split_indices(by_class[mixed], split, 7, seed=2)])
                == set(split_indices(by_class, split, 7, seed=2)))


def _colour_folder(root, extra: int = 0, suffix: str = "png"):
    """3 classes of 8 (+ ``extra`` in the last) solid-colour 32-px images, each its own colour, and a test split."""
    from PIL import Image

    for split, count in (("train", 8), ("test", 2)):
        for label, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(count + (extra if split == "train" and name == "cat" else 0)):
                colour = (40 + 20 * i, 30 + 70 * label, (25 * i + 90 * label) % 256)
                Image.new("RGB", (32, 32), colour).save(root / split / name / f"{i}.{suffix}")
    return root


def test_the_validation_split_must_come_from_the_backbones_copy_of_the_data(tmp_path):
    """A copy whose seeded validation split would name other images (here, one image more) is refused; the same
    images re-encoded are not."""
    original = _colour_folder(tmp_path / "original")
    split = load_split("folder", "val", original, val_size=6, seed=0)
    config = {"num_classes": 3, "class_names": ["ant", "bee", "cat"], "dataset": "folder", "split_seed": 0,
              "split_sizes": {"train": 18, "val": 6}, "input_size": 32,
              "val_fingerprint": data.held_out_fingerprint("folder", original, 32, 6, 0)}
    check_fits_backbone(split, "val", "folder", 6, 0, config, original)
    check_fits_backbone(split, "val", "folder", 6, 0, config, _colour_folder(tmp_path / "jpeg", suffix="jpg"))
    for extra in (1, -1):  # one image more or fewer: the config's split sizes, 18 + 6, name the count
        other = _colour_folder(tmp_path / f"count{extra}", extra=extra)
        with pytest.raises(DataError, match=f"holds {24 + extra} training images, the copy the backbone was trained "
                                            "on 24: from another count the same seed draws another validation split"):
            check_fits_backbone(load_split("folder", "val", other, val_size=6, seed=0), "val", "folder", 6, 0, config,
                                other)
    recoloured = _colour_folder(tmp_path / "recoloured")  # as many images, others
    for image in (recoloured / "train").rglob("*.png"):
        ImageOps.invert(Image.open(image).convert("RGB")).save(image)
    with pytest.raises(DataError, match="holds other images, or orders them otherwise"):
        check_fits_backbone(load_split("folder", "val", recoloured, val_size=6, seed=0), "val", "folder", 6, 0,
                            config, recoloured)


def test_a_copy_read_under_another_data_set_name_is_held_to_the_backbones_split(tmp_path):
    """An ImageFolder copy of the backbone's data set read as ``folder`` (the backbone's is named ``cifar10``) is
    known by its classes: its validation split must still be the backbone's, from the same images."""
    original = _colour_folder(tmp_path / "original")
    config = {"num_classes": 3, "class_names": ["ant", "bee", "cat"], "dataset": "cifar10", "split_seed": 0,
              "split_sizes": {"train": 18, "val": 6}, "input_size": 32,
              "val_fingerprint": data.held_out_fingerprint("folder", original, 32, 6, 0)}
    check_fits_backbone(load_split("folder", "val", original, val_size=6, seed=0), "val", "folder", 6, 0, config,
                        original)
    with pytest.raises(DataError, match="would hold images the backbone trained on"):
        check_fits_backbone(load_split("folder", "val", original, val_size=6, seed=1), "val", "folder", 6, 1, config,
                            original)
    grown = _colour_folder(tmp_path / "grown", extra=1)
    with pytest.raises(DataError, match="holds 25 training images, the copy the backbone was trained on 24"):
        check_fits_backbone(load_split("folder", "val", grown, val_size=6, seed=0), "val", "folder", 6, 0, config,
                            grown)


def test_a_budget_of_zero_streams_and_an_unreadable_folder_is_one_error(tmp_path):
    original = _colour_folder(tmp_path / "original")
    assert isinstance(load_split("folder", "val", original, val_size=6, memory_budget_mb=0).images, StreamedImages)
    unreadable = _colour_folder(tmp_path / "bitmaps", suffix="bmp")
    with pytest.raises(DataError, match="cannot read"):
        load_split("folder", "train", unreadable, val_size=6)
    # images beside the class folders, or with none (timm would make them a class named '')
    from PIL import Image
    stray = _colour_folder(tmp_path / "stray")
    Image.new("RGB", (32, 32)).save(stray / "train" / "stray.png")
    (tmp_path / "flat" / "train" / "images").mkdir(parents=True)  # one folder of images: one class
    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "train" / "images" / "0.png")
    members = tmp_path / "tarred"  # a tar of a folder whose images lie beside the class folders: './0.png'
    members.mkdir()
    with tarfile.open(members / "train.tar", "w") as archive:
        archive.add(stray / "train", arcname=".")
    for root, classes in ((stray, "'', 'ant', 'bee', 'cat'"), (tmp_path / "flat", "'images'"),
                          (members, "'.', 'ant', 'bee', 'cat'")):
        with pytest.raises(DataError, match=rf"holds images outside class folders, or one class only \({classes}\): "
                                            rf".*<class>/<image>\), two classes at least$"):
            load_split("folder", "train", root, val_size=1)
    # an ImageFolder tar cut short (a broken copy or download), or empty
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "whole.tar", "w") as archive:
        archive.add(original / "train", arcname=".")
    with tarfile.open(tars / "no_images.tar", "w") as archive:
        archive.add(tars / "whole.tar", arcname="readme.txt")
    for damage, content in (("cut", (tars / "whole.tar").read_bytes()[:700]), ("empty", b""),
                            ("no_images", (tars / "no_images.tar").read_bytes())):
        (tars / damage).mkdir()
        (tars / damage / "train.tar").write_bytes(content)
        with pytest.raises(DataError, match=f"cannot read {tars / damage / 'train.tar'}: "):
            load_split("folder", "train", tars / damage, val_size=6)


@pytest.mark.parametrize("damage", ["empty", "not_an_image", "broken_link"])
def test_an_unreadable_image_is_an_error_naming_it_not_its_neighbour_under_its_label(tmp_path, damage):
    root = _colour_folder(tmp_path / "damaged")
    (root / "test" / "ant" / "1.png").unlink()
    if damage == "broken_link":  # a file that cannot be opened at all
        (root / "test" / "ant" / "1.png").symlink_to(tmp_path / "moved.png")
    else:
        (root / "test" / "ant" / "1.png").write_bytes(b"" if damage == "empty" else b"garbage")
    for budget in (None, 0):  # decoded into memory, or streamed
        with pytest.raises(DataError, match=rf"cannot read image {root}/test/ant/1\.png"):  # where it is
            load_split("folder", "test", root, memory_budget_mb=budget).images[:]
    children = set(multiprocessing.active_children())
    with pytest.raises(DataError, match=r"^cannot read image .*ant/1\.png[^\n]*$"):  # one line, from a worker
        list(load_split("folder", "test", root, memory_budget_mb=0).batches(4))
    assert set(multiprocessing.active_children()) <= children  # the workers stopped with the error


def test_an_image_of_more_pixels_than_pil_opens_is_named(tmp_path, monkeypatch):
    """PIL refuses an image of over twice ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb) with an error that is
    no OSError; it is named like any unreadable image, not a traceback."""
    root = _colour_folder(tmp_path / "data")
    Image.new("RGB", (64, 64)).save(root / "test" / "ant" / "1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)  # the 32-px images open, the 64-px one does not
    with pytest.raises(DataError, match=rf"^cannot read image {root}/test/ant/1\.png: Image size \(4096 pixels\) "
                                        rf"exceeds limit"):
        load_split("folder", "test", root)


def test_every_unreadable_image_of_a_decoded_split_is_named_in_one_error(tmp_path, monkeypatch):
    """One run names them all, not one per run: the split is decoded to the end first."""
    root = _colour_folder(tmp_path / "damaged")
    for name in ("ant/0", "bee/1", "cat/0"):
        (root / "train" / f"{name}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^cannot read 3 images: .*train/ant/0\.png \(.*\); .*train/bee/1\.png "
                                        r"\(.*\); .*train/cat/0\.png \(.*\) \(replace them with readable images"):
        load_split("folder", "train", root, val_size=6)
    monkeypatch.setattr(data, "UNREADABLE_NAMED", 2)
    with pytest.raises(DataError, match=r"^cannot read 3 images: .*ant/0\.png .*; .*bee/1\.png \([^;]*\); and 1 "
                                        r"more \(replace"):
        load_split("folder", "train", root, val_size=6)


def test_test_split_sizes_and_labels(data_dir):
    test = load_split("cifar10", "test", data_dir)
    assert test.images.shape == (10000, 3, 32, 32) and str(test.images.dtype) == "torch.uint8"
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    assert test.class_names[:3] == ("airplane", "automobile", "bird")


def test_train_val_limit_is_a_mixed_subset(data_dir):
    val = load_split("cifar10", "val", data_dir, limit=200)
    assert len(val) == 200
    assert len(set(val.labels.tolist())) == 10  # a seeded subset, not the first (class-sorted) images
    again = load_split("cifar10", "val", data_dir, limit=200)
    assert (again.images == val.images).all()
    # each image is named by its index in the training file, whatever subset of the split holds it
    whole = load_split("cifar10", "val", data_dir)
    positions = limited_positions(len(whole), 200, DEFAULT_SPLIT_SEED)
    assert np.array_equal(val.file_indices, whole.file_indices[positions])
    assert torch.equal(val.images, whole.images[positions]) and len(set(whole.file_indices)) == len(whole)


@pytest.mark.parametrize(("stray", "message"), [
    ("train/cat/2019/0.png", r"train/cat/2019/0.png is in a folder inside a class folder, which would be a class of "
                             r"its own \('2019'\): keep each class's images in .*/train/<class>/ itself$"),
    ("train/bee/._0.png", r"train/bee/._0.png is hidden \(a name that starts with '.'\) and would be read as an "
                          r"image of the data set: delete it$"),
    ("train/.ipynb_checkpoints/0.png", r"train/.ipynb_checkpoints/0.png is hidden"),
])
def test_an_image_a_class_folder_does_not_hold_directly_is_refused(tmp_path, stray, message):
    """timm labels an image by its innermost folder: ``cat/2019/`` would be a class '2019', shared by every class
    holding one, and a hidden file or folder would be read as images; the user's layout is refused, not relabelled."""
    from PIL import Image

    root = _colour_folder(tmp_path / "data")
    (root / stray).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(root / stray, format="PNG")
    with pytest.raises(DataError, match=message):
        load_split("folder", "train", root, val_size=6)


def test_a_split_or_class_folders_given_as_the_data_directory_are_named(tmp_path):
    root = _colour_folder(tmp_path / "data")
    with pytest.raises(DataError, match=rf"\({root / 'train'} looks like a split itself: pass the directory above it, "
                                        rf"--data-dir {root}\)$"):
        load_split("folder", "test", root / "train")
    with tarfile.open(root / "train.tar", "w") as split:
        split.add(root / "train", arcname=".")
    with pytest.raises(DataError, match=rf"is a file, not a directory: .*\({root / 'train.tar'} looks like a split "
                                        rf"itself: pass the directory above it, --data-dir {root}\)$"):
        load_split("folder", "test", root / "train.tar")
    flat = (root / "train").rename(tmp_path / "flat")  # class folders with no split above them
    with pytest.raises(DataError, match=rf"\({flat} holds class folders: move them into {flat}/train/, and a test "
                                        rf"split's into test/\)$"):
        load_split("folder", "train", flat)


def test_a_split_in_a_compressed_archive_is_named(tmp_path):
    """timm reads a split from an uncompressed .tar only; a train.tar.gz beside the data is named, not passed over."""
    root = _colour_folder(tmp_path / "data")
    with tarfile.open(root / "test.tar.gz", "w:gz") as packed:
        packed.add(root / "test", arcname=".")
    (root / "test").rename(tmp_path / "unpacked")
    with pytest.raises(DataError, match=rf"\({root / 'test.tar.gz'} is compressed, and only an uncompressed \.tar is "
                                        rf"read: unpack it into {root / 'test'}/ or decompress it into "
                                        rf"{root / 'test'}\.tar\)$"):
        load_split("folder", "test", root)
    load_split("folder", "train", root, val_size=6)  # the training split beside it is read


def test_split_folders_named_in_another_case_are_named(tmp_path):
    """Split folders are looked for in lower case: on a case-sensitive file system ``Train/`` is not ``train/``. The
    error names every split folder so named, not only the missing one, to rename them at once; none is read."""
    root = _colour_folder(tmp_path / "data")
    (root / "train").rename(root / "Train")
    (root / "test").rename(root / "VAL")
    if (root / "train").exists():
        pytest.skip("a case-insensitive file system finds Train/ as train/")
    with pytest.raises(DataError, match=rf"^no 'train' split in {root}: .*\(split folders are looked for in lower "
                                        rf"case: rename Train to train, VAL to val in {root}\)$"):
        load_split("folder", "train", root, val_size=6)
    (root / "Train").rename(root / "train")
    with pytest.raises(DataError, match=r"\(split folders are looked for in lower case: rename VAL to val in "):
        load_split("folder", "test", root)


@pytest.mark.parametrize("descending", [False, True])
def test_classes_a_natural_sort_ties_are_numbered_alike_in_every_process(tmp_path, monkeypatch, descending):
    """timm orders the classes its case-blind natural sort ties ('Cat' and 'cat', 'class01' and 'class1') as a set of
    strings iterates, which differs with each process's hash seed: a backbone.py run and an evaluate.py run numbered
    them apart. Either set order here gives the one order, by name."""
    from timm.data.readers import reader_image_folder, reader_image_in_tar

    for module in (reader_image_folder, reader_image_in_tar):
        monkeypatch.setattr(module, "set", lambda items: sorted(dict.fromkeys(items), reverse=descending),
                            raising=False)
    for split in ("train", "test"):
        for name in ("class1", "Cat", "class01", "cat"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / name / "0.png")
    (tmp_path / "tarred").mkdir()
    with tarfile.open(tmp_path / "tarred" / "train.tar", "w") as tar:
        tar.add(tmp_path / "data" / "train", arcname=".")
    for root, split in ((tmp_path / "data", "train"), (tmp_path / "data", "test"), (tmp_path / "tarred", "train")):
        assert split_class_names("folder", split, root) == ("Cat", "cat", "class01", "class1")


def test_images_of_formats_that_are_not_read_are_named(tmp_path):
    from PIL import Image

    root = _colour_folder(tmp_path / "data")
    for name in ("0.webp", "1.bmp"):
        Image.new("RGB", (32, 32)).save(root / "train" / "ant" / name)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"/train holds images in formats that are not read, skipped \(\.bmp, "
                                         r"\.webp\): convert them to PNG or JPEG to use them"):
        assert len(load_split("folder", "train", root, val_size=6)) == 18


@pytest.mark.parametrize("emptied", [("train",), ("test",), ("train", "test")])
def test_a_class_folder_without_images_is_named(tmp_path, emptied):
    """timm numbers the classes that hold images: an empty class folder would drop its class from a split (from
    the model, where every split lacks it) or blame the other split. It is refused, named, in any split, whatever
    else it holds (a file that is no image, macOS's .DS_Store); an empty hidden folder is no class."""
    root = _colour_folder(tmp_path / "data")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    for split in emptied:
        for image in (root / split / "bee").iterdir():
            image.unlink()
    (root / emptied[0] / "bee" / "notes.txt").write_text("not an image")
    (root / emptied[0] / "bee" / ".DS_Store").write_bytes(b"")
    message = (rf"^class folder {root / emptied[0] / 'bee'} holds no images \(PNG or JPEG\), so its class would be "
               rf"left out: put the class's images in it, or remove the class from every split$")
    with pytest.raises(DataError, match=message):
        load_split("folder", emptied[0], root, val_size=6)
    with pytest.raises(DataError, match=message):
        split_class_names("folder", emptied[0], root)


def test_a_16_bit_image_is_scaled_to_8_bits(tmp_path):
    """PIL's convert('RGB') clips a 16-bit grey PNG to white; its levels are scaled instead."""
    from PIL import Image

    root = _colour_folder(tmp_path / "data")
    Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(root / "test" / "ant" / "2.png")
    split = load_split("folder", "test", root)
    (image,) = split.images[(split.labels == 0).nonzero().flatten()[-1:]]
    assert image.unique().tolist() == [round(30000 / 257)]


def test_a_photo_is_turned_upright_as_its_exif_tag_says(tmp_path):
    """A phone stores a photo taken sideways as its sensor read it, tagged with how to turn it for display: the
    data sets, and so every split and ``PrunedViT.preprocess``, turn it as every viewer does."""
    from PIL import ExifTags, Image

    root = _colour_folder(tmp_path / "data")
    sideways = np.zeros((32, 64, 3), dtype=np.uint8)
    sideways[:, :32] = 255  # its left half white: the top half, turned a quarter clockwise (orientation 6)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(sideways).save(root / "test" / "ant" / "2.jpg", exif=exif, quality=95)
    split = load_split("folder", "test", root)
    (image,) = split.images[(split.labels == 0).nonzero().flatten()[-1:]]
    top, bottom = image[:, :16].float().mean(), image[:, 16:].float().mean()
    assert top > 240 and bottom < 15


def test_one_file_is_indexed_once_per_process(image_folder_224, monkeypatch):
    """train and val cut one file, which is opened (for a tar: every member header read) once; a streamed
    split opens a reader of its own, as its reader thread must not share one."""
    opened = []
    open_raw_split = data._open_raw_split
    monkeypatch.setattr(data, "_open_raw_split", lambda *args: opened.append(args) or open_raw_split(*args))
    data._shared_raw_split.cache_clear()
    train = load_split("folder", "train", image_folder_224, input_size=224, val_size=6)
    val = load_split("folder", "val", image_folder_224, input_size=224, val_size=6)
    assert len(opened) == 1 and (len(train), len(val)) == (18, 6)
    streamed = load_split("folder", "val", image_folder_224, input_size=224, val_size=6, memory_budget_mb=0.01)
    assert torch.equal(streamed.images[[0, 5]], val.images[[0, 5]]) and len(opened) == 2


def test_folder_dataset_reads_an_imagefolder_tar(data_dir, tmp_path):
    (tmp_path / "train.tar").symlink_to(data_dir / "cifar10" / "train.tar")
    (tmp_path / "test.tar").symlink_to(data_dir / "cifar10" / "test.tar")
    split = load_split("folder", "test", tmp_path, limit=10)
    assert split.images.shape == (10, 3, 32, 32)


def test_missing_dataset_offline_gives_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar10 not found"):
        load_split("cifar10", "test", tmp_path, download=False)
    with pytest.raises(DataError, match="does not exist"):
        load_split("cifar10", "test", tmp_path / "nope")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="a_file is a file, not a directory"):
        load_split("cifar10", "test", tmp_path / "a_file", download=True)
    with pytest.raises(DataError, match="unknown data set"):
        load_split("mnist", "test", tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_split("cifar10", "validation", tmp_path)


def test_ones_own_image_folder_is_told_apart_from_a_missing_data_set_and_other_classes(image_folder_224,
                                                                                          monkeypatch, tmp_path):
    """The mistakes of a first run on one's own data: the default --dataset (cifar10) on an ImageFolder is not
    downloaded into it (unless the directory has a cifar10/ of its own); the reference backbone's 10 classes are
    refused before the 3 are split or decoded (its 5,000 validation images would not fit either); a validation
    size too large names the flag."""
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=rf"^cifar10 not found in {tmp_path}, which holds an ImageFolder data set "
                                        rf"\({tmp_path / 'train'}\): pass --dataset folder"):
        load_split("cifar10", "train", tmp_path, download=True)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "train"]  # nothing downloaded into it
    (tmp_path / "cifar10").mkdir()  # where torchvision's files would be: looked for there, as before
    with pytest.raises(DataError, match=rf"^cifar10 not found in {tmp_path}: expected .*; pass --data-dir DIR "
                                        rf"\(data_dir= in Python\) or set {DATA_DIR_ENV}$"):
        load_split("cifar10", "train", tmp_path, download=False)
    (tmp_path / "cifar10" / "train.tar").write_bytes(b"")  # the data set's own directory given as --data-dir
    with pytest.raises(DataError, match=rf"^cifar10 not found in {tmp_path / 'cifar10'}, which looks like cifar10's "
                                        rf"own directory: pass the directory above it, --data-dir {tmp_path}$"):
        load_split("cifar10", "train", tmp_path / "cifar10", download=True)
    monkeypatch.setattr(data, "_decode", lambda *args: pytest.fail("decoded before the classes were checked"))
    reference = {"num_classes": 10, "class_names": [f"class {i}" for i in range(10)], "input_size": 224,
                 "dataset": "cifar10", "split_seed": 0, "split_sizes": {"train": 45000, "val": 5000}}
    with pytest.raises(DataError, match="the data set's 3 classes are not the backbone's 10"):
        load_checked_split("folder", "train", image_folder_224, reference, val_size=5000, seed=0)
    with pytest.raises(DataError, match=r"^validation size 5000 must be between 1 and 23, the data set's 24 training "
                                        r"images less one \(backbone.py's and train.py's --val-size\)$"):
        load_split("folder", "train", image_folder_224, input_size=224, val_size=5000)


def test_a_split_over_the_memory_budget_streams_the_same_pixels(image_folder_224):
    decoded = load_split("folder", "train", image_folder_224, input_size=224, val_size=6)
    streamed = load_split("folder", "train", image_folder_224, input_size=224, val_size=6, memory_budget_mb=1)
    assert isinstance(decoded.images, torch.Tensor) and isinstance(streamed.images, StreamedImages)
    assert len(streamed) == len(decoded) == 18 and torch.equal(streamed.labels, decoded.labels)
    assert torch.equal(streamed.images[3], decoded.images[3])
    assert torch.equal(streamed.images[[7, 2, 7]], decoded.images[[7, 2, 7]])
    assert torch.equal(streamed.images[torch.tensor([0, 5])], decoded.images[torch.tensor([0, 5])])
    assert torch.equal(streamed.images[4:9], decoded.images[4:9])
    for mine, theirs in zip(streamed.batches(5), decoded.batches(5), strict=True):
        assert torch.equal(mine, theirs)


def logged_images(log: Path, count: int) -> list[tuple[Image.Image, int]]:
    """A data set of ``count`` grey images; each opening appends the opening process to ``log``."""
    with log.open("a") as file:
        file.write(f"{os.getpid()}\n")
    return [(Image.new("RGB", (8, 8), (value,) * 3), 0) for value in range(count)]


@pytest.mark.skipif(torch.multiprocessing.get_start_method() != "fork", reason="workers fork on Linux before 3.14")
def test_loader_workers_share_the_data_set_opened_once(tmp_path):
    """Opening a data set reads the index of its files (a tar's every member header): the workers that decode
    a streamed split ahead, epoch after epoch, take the one its loader opened instead of each opening it."""
    log = tmp_path / "opened"
    images = StreamedImages(functools.partial(logged_images, log, 8), np.arange(8), 8)
    split = ImageSplit(images, torch.zeros(8, dtype=torch.long), ("grey",))
    for _ in range(2):  # two epochs, each decoded by BATCH_WORKERS workers
        batches = list(split.batches(4))
        assert [batch[:, 0, 0, 0].tolist() for batch in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert log.read_text().split() == [str(os.getpid())]
    assert torch.equal(images[[5]], batches[1][1:2])  # this process reads through a data set of its own
    assert log.read_text().split() == [str(os.getpid())] * 2


def test_streamed_tar_prefetches_ahead_and_pickles_without_open_files(data_dir):
    decoded = load_split("cifar10", "val", data_dir, limit=32)
    streamed = load_split("cifar10", "val", data_dir, limit=32, memory_budget_mb=0.01)
    streamed.images.prefetch([4, 9])
    assert set(streamed.images._pending) == {4, 9}  # queued on the reader thread before anyone asks
    assert torch.equal(streamed.images[[9, 1, 4]], decoded.images[[9, 1, 4]]) and not streamed.images._pending
    copy = pickle.loads(pickle.dumps(streamed.images))  # the tar it has open stays behind; the copy reopens it
    assert torch.equal(copy[[3, 30]], decoded.images[[3, 30]])


def test_streamed_and_decoded_engines_give_identical_observations(data_dir):
    """What the agents see does not depend on whether the server streams its images."""
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2,
                            embed_dim=48, num_heads=3).eval()
    config = {"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3}
    runs = []
    for budget in (None, 0.01):
        split = load_split("cifar10", "val", data_dir, limit=32, memory_budget_mb=budget)
        engine = PruningEngine(StagedViT(vit, (1,)), config, split.images, split.labels, 0.5, "merge")
        problem = {"images_per_env": 4, "prune_points": [1], "reward_baseline": "none"}
        env = TokenPruningEnv({"server": engine, "problem": problem})
        runs.append([env.reset(seed=3)[0], env.reset()[0], env.reset()[0]])  # the later two were read ahead
    for streamed, decoded in zip(*runs, strict=True):
        for agent in streamed:
            for key in ("tokens", "live"):
                np.testing.assert_array_equal(streamed[agent][key], decoded[agent][key])


def test_a_split_must_fit_what_the_backbone_was_trained_on():
    split = ImageSplit(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), ("cat", "dog"))
    config = {"num_classes": 2, "class_names": ["cat", "dog"], "dataset": "pets", "split_seed": 0,
              "split_sizes": {"train": 900, "val": 100}}
    for val_size in (100, 50):  # held out, or a part of it
        check_fits_backbone(split, "val", "pets", val_size, 0, config)
    check_fits_backbone(split, "train", "pets", 500, 3, config)  # the agents may train on the backbone's images
    for val_size, seed, dataset in ((101, 0, "pets"), (100, 1, "pets"), (500, 3, "other")):  # "other": its classes
        with pytest.raises(DataError, match="would hold images the backbone trained on"):
            check_fits_backbone(split, "val", dataset, val_size, seed, config)
    for other, why in (({"class_names": ["dog", "cat"]}, "the same classes in another order"),
                       ({"class_names": None, "num_classes": 3}, "unnamed in the backbone"),
                       ({"class_names": ["cat", "frog"]},
                        "the backbone has class 'frog' that the data set lacks; the data set has class 'dog' that the "
                        "backbone lacks")):
        with pytest.raises(DataError, match=f"are not the backbone's .*{why}"):
            check_fits_backbone(split, "test", "pets", 100, 0, {**config, **other})


def test_class_names_that_differ_only_in_their_unicode_form_are_shown_so():
    composed, decomposed = unicodedata.normalize("NFC", "dög"), unicodedata.normalize("NFD", "dög")
    assert class_difference([decomposed, "cat"], [composed, "cat"], "test/", "train/") == (
        "train/ has class 'd\\xf6g' that test/ lacks; test/ has class 'do\\u0308g' that train/ lacks; some are the "
        "same names in another Unicode form (macOS writes file names decomposed, NFD)")
    many = [f"c{i}" for i in range(8)]
    assert class_difference([], many, "test/", "train/") == (
        "train/ has classes 'c0', 'c1', 'c2', 'c3', 'c4' and 3 more that test/ lacks")


def test_a_data_set_known_by_name_with_another_count_of_classes_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """--dataset cifar100 with a CIFAR-10 backbone downloaded CIFAR-100 (170 MB) before its classes were
    compared."""
    monkeypatch.setattr(data, "_open_raw_split", lambda *args: pytest.fail("read before the class count was checked"))
    config = {"num_classes": 10, "dataset": "cifar10", "input_size": 32}
    with pytest.raises(DataError, match=r"^cifar100 has 100 classes, the backbone 10 \(it was trained on cifar10: "
                                        r"pass --dataset cifar10, or a backbone trained on cifar100\)$"):
        load_checked_split("cifar100", "test", tmp_path, config, val_size=5000, seed=0, download=True)
