"""224-px timm ViTs end to end on a generated ImageFolder (``dataset folder``): for each kind of ViT,
backbone.py trains it, train.py trains the agents on it, evaluate.py scores them against the heuristics.
Tiny widths and depths keep it to seconds per model on a CPU; the geometry (16-px patches, 196 tokens,
prefix tokens, heads) is the real one. Training and one evaluation stream the images from the files (a
memory budget below the data set's size), and streaming gives the same table as decoding."""

import json
from pathlib import Path

import pytest

import backbone
import evaluate
import train
from policies.checkpoints import latest_checkpoint

TINY_224 = ["depth=3", "embed_dim=48", "num_heads=3"]
STREAM = "0.5"  # MB: the generated splits take 2-3 MB decoded, so they stream
MODELS = {  # name: (timm model, extra kwargs)
    "deit_distilled": ("deit_tiny_distilled_patch16_224", []),  # class + distillation token, two heads
    "registers": ("vit_tiny_patch16_224", ["reg_tokens=4"]),  # four register tokens
    "avg_pool": ("vit_tiny_patch16_224", ["class_token=False", "global_pool='avg'"]),  # no class token
}


def data_flags(folder: Path) -> list[str]:
    return ["--dataset", "folder", "--data-dir", str(folder), "--val-size", "6"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(MODELS))
def test_224px_vit_trains_and_evaluates(variant, image_folder_224, tmp_path):
    model, extra = MODELS[variant]
    assert backbone.main(["--model", model, "--model-kwargs", *TINY_224, *extra, *data_flags(image_folder_224),
                          "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
                          "--output-dir", str(tmp_path / "backbone")]) == 0
    config = json.loads((tmp_path / "backbone" / "backbone" / "config.json").read_text())
    assert config["input_size"] == 224 and config["class_names"] == ["ant", "bee", "cat"]

    assert train.main(["--backbone", str(tmp_path / "backbone" / "backbone"), *data_flags(image_folder_224),
                       "--prune-points", "1,2", "--val-limit", "6", "--images-per-env", "2", "--warm-start", "none",
                       "--iterations", "1", "--checkpoint-every", "1", "--num-workers", "0",
                       "--train-batch-size-per-learner", "16", "--minibatch-size", "16", "--num-epochs", "1",
                       "--num-cpus", "2", "--memory-budget-mb", STREAM, "--output-dir", str(tmp_path / "run")]) == 0

    def evaluation(*extra: str) -> dict[str, dict]:
        output = tmp_path / f"results{len(extra)}"
        assert evaluate.main(["--checkpoint", str(latest_checkpoint(tmp_path / "run")), "--data-dir",
                              str(image_folder_224), "--budgets", "0.5", "--no-speed", "--output-dir", str(output),
                              *extra]) == 0
        return {row["method"]: row for row in json.loads((output / "results.json").read_text())["rows"]}

    rows = evaluation()
    assert rows["Baseline (unpruned)"]["keep_ratio"] == 1.0
    assert rows["MARL exact"]["gflops_backbone"] == pytest.approx(rows["Greedy attention"]["gflops_backbone"])
    assert rows["MARL exact"]["gflops_backbone"] < 0.7 * rows["Baseline (unpruned)"]["gflops_backbone"]
    assert rows["MARL exact"]["keep_ratio"] == pytest.approx(49 / 196)  # 196 -> 98 -> 49 patch tokens
    if variant == "deit_distilled":
        assert evaluation("--memory-budget-mb", STREAM) == rows
