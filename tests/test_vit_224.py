"""224-px timm ViTs end to end on a generated ImageFolder (``dataset folder``): for each kind of ViT,
backbone.py trains it and evaluate.py scores a policy on it against the heuristics; on the kind with register
tokens, train.py trains that policy. Tiny widths and depths keep it to seconds per model on a CPU; the
geometry (16-px patches, 196 tokens, prefix tokens, heads) is the real one. Training and one evaluation
stream the images from the files (a memory budget below the data set's size), and streaming gives the same
table as decoding."""

import json
from pathlib import Path

import pytest

import backbone
import evaluate
import train
from policies.checkpoints import latest_checkpoint
from tests.tiny_policies import write_checkpoint

TINY_224 = ["depth=3", "embed_dim=48", "num_heads=3"]
STREAM = "0.5"  # MB: the generated splits take 2-3 MB decoded, so they stream
MODELS = {  # name: (timm model, extra kwargs)
    "deit_distilled": ("deit_tiny_distilled_patch16_224", []),  # class + distillation token, two heads
    "registers": ("vit_tiny_patch16_224", ["reg_tokens=4"]),  # four register tokens
    "avg_pool": ("vit_tiny_patch16_224", ["class_token=False", "global_pool='avg'"]),  # no class token
}


def data_flags(folder: Path) -> list[str]:
    """backbone.py's and train.py's flags for the generated folder."""
    return ["--dataset", "folder", "--data-dir", str(folder), "--val-size", "6"]


def train_backbone(variant: str, folder: Path, tmp_path: Path) -> Path:
    """backbone.py trains the tiny 224-px ViT of ``variant`` for one epoch; returns its checkpoint."""
    model, extra = MODELS[variant]
    assert backbone.main(["--model", model, "--model-kwargs", *TINY_224, *extra, *data_flags(folder),
                          "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
                          "--output-dir", str(tmp_path / "backbone")]) == 0
    config = json.loads((tmp_path / "backbone" / "backbone" / "config.json").read_text())
    assert config["input_size"] == 224 and config["class_names"] == ["ant", "bee", "cat"]
    return tmp_path / "backbone" / "backbone"


def evaluate_rows(checkpoint: Path, folder: Path, output: Path, *extra: str) -> dict[str, dict]:
    """evaluate.py's rows at r = 0.5 against the heuristics, by method."""
    assert evaluate.main(["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(folder),
                          "--budgets", "0.5", "--no-speed", "--output-dir", str(output), *extra]) == 0
    return {row["method"]: row for row in json.loads((output / "results.json").read_text())["rows"]}


def check_rows(rows: dict[str, dict]) -> None:
    assert rows["Baseline (unpruned)"]["keep_ratio"] == 1.0
    assert rows["MARL exact"]["gflops_backbone"] == pytest.approx(rows["Greedy attention"]["gflops_backbone"])
    assert rows["MARL exact"]["gflops_backbone"] < 0.7 * rows["Baseline (unpruned)"]["gflops_backbone"]
    assert rows["MARL exact"]["keep_ratio"] == pytest.approx(49 / 196)  # 196 -> 98 -> 49 patch tokens


@pytest.mark.slow
def test_224px_vit_with_registers_trains_and_evaluates(image_folder_224, tmp_path):
    """The whole chain, with Ray: the agents are trained by train.py on a ViT with four register tokens."""
    trained = train_backbone("registers", image_folder_224, tmp_path)
    assert train.main(["--backbone", str(trained), *data_flags(image_folder_224),
                       "--prune-points", "1,2", "--val-limit", "6", "--images-per-env", "2",
                       "--rollouts-per-image", "2", "--warm-start", "none",
                       "--iterations", "1", "--checkpoint-every", "1", "--num-workers", "0",
                       "--train-batch-size-per-learner", "16", "--minibatch-size", "16", "--num-epochs", "1",
                       "--num-cpus", "2", "--memory-budget-mb", STREAM, "--output-dir", str(tmp_path / "run")]) == 0
    check_rows(evaluate_rows(latest_checkpoint(tmp_path / "run"), image_folder_224, tmp_path / "results"))


@pytest.mark.parametrize("variant", ["deit_distilled", "avg_pool"])
def test_224px_vit_kinds_evaluate(variant, image_folder_224, tmp_path):
    """The other kinds through backbone.py and evaluate.py, with a policy checkpoint in train.py's layout
    (the pruning engine that train.py's env runs is evaluate.py's; Ray is the registers test's)."""
    trained = train_backbone(variant, image_folder_224, tmp_path)
    checkpoint = write_checkpoint(tmp_path / "policy", trained, num_patches=196, prune_points=(1, 2), dataset="folder",
                                  val_size=6)  # the split the backbone held out, where the best heuristic is chosen
    rows = evaluate_rows(checkpoint, image_folder_224, tmp_path / "results")
    check_rows(rows)
    if variant == "deit_distilled":
        assert evaluate_rows(checkpoint, image_folder_224, tmp_path / "streamed", "--memory-budget-mb", STREAM) == rows
