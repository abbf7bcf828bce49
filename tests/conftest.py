"""Shared fixtures: where the data lives, a tiny backbone and policy checkpoint, and a HOME that Ray cannot litter."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from backbone_training import model_card
from envs.vit.backbone_checkpoint import load_backbone, save_backbone
from envs.vit.data import DATA_DIR_ENV
from envs.vit.staged_vit import StagedViT
from policies.export import export_policies
from tests.tiny_policies import PRUNE_POINTS, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
os.environ["HOME"] = tempfile.mkdtemp(prefix="marl-pruning-home-")  # Ray writes under ~ otherwise
atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)
if "OMP_NUM_THREADS" not in os.environ:
    # One torch thread per process, here and (through the variable) in Ray's workers and the subprocesses: on the
    # CI's 2 cores the tests share the CPUs with Ray's processes and other jobs, and torch's two OpenMP threads
    # spin-wait for each other whenever one is descheduled. tests/test_backbone.py with test_vit_224's evaluations
    # took 44-47 s quiet and 76 s beside one busy process with two threads; 52-54 s either way with one.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


SYSTEM_TESTS_LEFT_OUT = pytest.StashKey[int]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the ``system`` tests (a two-node Ray cluster, faults injected into a running job: minutes each on
    a 2-core CPU) unless ``-m`` selects by marker or the command line names their file."""
    if config.option.markexpr:
        return
    named = {Path(arg.split("::")[0]).resolve() for arg in config.args}
    left_out = [item for item in items if item.get_closest_marker("system") and item.path not in named]
    if left_out:
        items[:] = [item for item in items if item not in left_out]
        config.hook.pytest_deselected(items=left_out)
    config.stash[SYSTEM_TESTS_LEFT_OUT] = len(left_out)


def pytest_report_collectionfinish(config: pytest.Config) -> str | list[str]:
    """One line under the collection count that says which tests were left out and how to run them."""
    left_out = config.stash.get(SYSTEM_TESTS_LEFT_OUT, 0)
    return f"{left_out} system tests left out (minutes each): python -m pytest -m system" if left_out else []


@pytest.fixture(scope="session", autouse=True)
def one_timed_pass_for_model_cards() -> Iterator[None]:
    """backbone.py times the eval throughput its model card reports at every export, a warm-up and
    THROUGHPUT_REPEATS passes over 256 images: 4 s for a 224-px model on one thread, 20 s over the suite's 27
    exports. No test reads the figure, so the exports time one pass after the warm-up (the median of several is
    envs.vit.timing's, which the benchmarks' tests run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_card, "THROUGHPUT_REPEATS", 1)
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared CIFAR-10 copy: ``$MARL_PRUNING_DATA_DIR``, else ``../shared/data`` beside the repo."""
    path = Path(os.environ.get(DATA_DIR_ENV) or REPO.parent / "shared" / "data")
    if not (path / "cifar10" / "test.tar").exists():
        pytest.skip(f"CIFAR-10 tars not found under {path} (set {DATA_DIR_ENV})")
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """An untrained 4-block ViT checkpoint with CIFAR-10 geometry (32x32, 4x4 patches, 10 classes)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS)
    config = {"model_name": "vit_tiny_patch16_224", "model_kwargs": TINY_KWARGS, "num_classes": 10,
              "class_names": CIFAR_CLASSES, "input_size": 32, "mean": [0.49, 0.48, 0.45],
              "std": [0.25, 0.24, 0.26], "dataset": "cifar10"}
    return save_backbone(model, config, tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture(scope="session")
def tiny_staged(tiny_backbone) -> tuple[StagedViT, dict]:
    """The tiny backbone split at ``tests.tiny_policies.PRUNE_POINTS``, in eval mode, and its config."""
    vit, config = load_backbone(tiny_backbone)
    return StagedViT(vit, PRUNE_POINTS).eval(), config


@pytest.fixture(scope="session")
def unexported_policy(tmp_path_factory, tiny_backbone, tiny_staged) -> Path:
    """A checkpoint of both policies on the tiny backbone, calibrated so decisions vary, in RLlib's files only
    (no export, as checkpoints were written before exports existed): loading it unpickles them, with a warning.
    For the tests of that path (its warning, its damaged pickles, its equality with the export); the others
    take :func:`tiny_policy`. Tests copy it before changing it."""
    return write_checkpoint(tmp_path_factory.mktemp("unexported_policy"), tiny_backbone, calibrate_on=tiny_staged[0])


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, unexported_policy) -> Path:
    """The same checkpoint with the export ``python -m policies.export`` writes, as train.py writes every
    checkpoint: what users load, read without a pickle or the warning about them, which would otherwise be
    every test's noise. Tests copy it before changing it."""
    path = Path(shutil.copytree(unexported_policy, tmp_path_factory.mktemp("policy") / "policy"))
    export_policies(path)
    return path


@pytest.fixture(scope="session")
def image_folder_224(tmp_path_factory) -> Path:
    """A generated ImageFolder data set (``folder`` layout): train/ and test/, 3 classes, JPEGs of assorted
    sizes around 224 px, so decoding resizes and centre-crops."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder224")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in ("ant", "bee", "cat"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                height, width = 224 + 16 * (i % 3), 224 + 24 * (i % 2)
                pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.jpg", quality=90)
    return root
