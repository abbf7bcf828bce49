"""What the export says of the backbone besides its weights: how it was trained (:func:`run_recipe`), its GFLOPs,
parameters and eval throughput (:func:`measurements`), and MODEL_CARD.md (:func:`model_card`), written beside the
weights from the config as exported (:func:`export_with_card`). Apart from backbone.py, whose ``train()`` only
fills the config: what a reader of the export is told is written in one place."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from envs.vit.backbone_checkpoint import read_backbone_config, save_backbone
from envs.vit.device import describe_device
from envs.vit.flops import ViTSpec, unpruned_gflops
from envs.vit.timing import images_per_second

THROUGHPUT_BATCH = 256  # images per batch of the eval throughput the model card reports
THROUGHPUT_REPEATS = 5  # timed passes over that batch, of which the card reports the median


def run_recipe(args: argparse.Namespace, history: list[dict], device: torch.device) -> dict:
    """How the backbone was trained, for the config and its model card: the recipe's flags, the schedule's
    changes, where it started from, and where and how long it trained."""
    recipe = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                            "label_smoothing", "mixup", "cutmix", "randaug",
                                            "randaug_magnitude", "seed", "pretrained", "limit")}
    recipe["schedule_changes"] = getattr(args, "schedule_changes", [])
    recipe["init_from"] = getattr(args, "init_summary", None)
    recipe.update(optimizer="adamw (timm, no decay on norms/biases/pos-embed)", schedule="warmup + cosine per step",
                  amp="bf16 autocast" if args.amp else "float32", device=describe_device(device),
                  compiled=args.compile, train_seconds=round(history[-1]["seconds"], 1) if history else 0)
    return recipe


def measurements(model: torch.nn.Module, config: dict, device: torch.device) -> dict:
    """What the model card reports of the trained model besides its accuracy: its GFLOPs, parameters and eval
    throughput on ``device``."""
    return {"gflops": round(unpruned_gflops(ViTSpec.from_model(model)), 4),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            f"images_per_s_b{THROUGHPUT_BATCH}": round(eval_images_per_second(model, config, device), 1),
            "throughput_device": describe_device(device)}


@torch.no_grad()
def eval_images_per_second(model: torch.nn.Module, config: dict, device: torch.device) -> float:
    """Median eval throughput in float32 over :data:`THROUGHPUT_REPEATS` passes on one batch of
    :data:`THROUGHPUT_BATCH` random images, after a warm-up pass (the card's figure)."""
    model.eval()
    size = config["input_size"]
    return images_per_second(model, torch.randn(THROUGHPUT_BATCH, 3, size, size, device=device), THROUGHPUT_BATCH,
                             THROUGHPUT_REPEATS)


def test_reading_note(config: dict) -> str:
    """Say every time the test split was read: a run extended after finishing has been read more than once."""
    readings = config.get("test_readings", [])
    if len(readings) <= 1:
        return "The test split was read once, after training."
    earlier = ", ".join(f"after epoch {r['epoch']} ({100 * r['test_accuracy']:.2f}%)" for r in readings[:-1])
    return (f"The test split was read only when a run finished: {earlier}; the schedule was then extended "
            f"with --resume --epochs, and the figure above is the final reading after epoch {readings[-1]['epoch']}.")


def model_card(config: dict) -> str:
    """A short Markdown card: what the model is, how it was trained, what it measured."""
    recipe = config["recipe"]
    changes = "".join((f"; from epoch {c['at_epoch'] + 1} the cosine schedule was re-set to {c['epochs']} epochs"
                       if c["epochs"] > c["at_epoch"] else f"; the run ended after epoch {c['at_epoch']}")
                      + (" to fit --time-budget" if c.get("by") == "--time-budget" else "")
                      for c in recipe.get("schedule_changes", []))
    rows = "\n".join(f"| {h['epoch']} | {h['loss']:.4f} | {100 * h['val_accuracy']:.2f} | {h['seconds']:.0f} |"
                     for h in config["history"])
    kwargs = ", ".join(f"{k}={v}" for k, v in config["model_kwargs"].items())
    compiled = " (torch.compile)" if recipe.get("compiled") else ""
    init_from = recipe.get("init_from")
    started_from = (f"Started from the weights of {init_from['path']} ({init_from['epochs']} epochs, "
                    f"{100 * init_from['test_accuracy']:.2f}% test), then " if init_from else "")
    sizes = config["split_sizes"]
    throughput = config[f"images_per_s_b{THROUGHPUT_BATCH}"]
    return f"""# {config['model_name']} ({kwargs}) on {config['dataset']}

| | |
|---|---|
| test top-1 ({sizes['test']} images, float32) | **{100 * config['test_accuracy']:.2f}%** |
| GFLOPs (multiply-accumulates, attention matmuls included) | {config['gflops']} |
| parameters | {config['params_m']} M |
| images/s, batch {THROUGHPUT_BATCH}, float32, {config['throughput_device']} | {throughput} |
| input | {config['input_size']}x{config['input_size']}, mean {config['mean']}, std {config['std']} |
| splits | train {sizes['train']}, val {sizes['val']} (seed {config['split_seed']}), test {sizes['test']} |
| weights | {config['weights_dtype']} safetensors |

Recipe: {started_from}{recipe['epochs']} epochs{changes}, batch {recipe['batch_size']}, AdamW lr {recipe['lr']} (per 512
images, scaled linearly), weight decay {recipe['weight_decay']}, {recipe['warmup_epochs']} warm-up epochs then
cosine per step, label smoothing {recipe['label_smoothing']}, mixup {recipe['mixup']}, cutmix {recipe['cutmix']},
RandAugment ops {recipe['randaug']}, random crop (pad 4) + flip, {recipe['amp']}, seed {recipe['seed']},
on {recipe['device']}{compiled} in {recipe['train_seconds'] / 60:.0f} min. {test_reading_note(config)}

| epoch | train loss | val top-1 % | elapsed s |
|---|---|---|---|
{rows}
"""


def export_with_card(model: torch.nn.Module, config: dict, directory: Path, half: bool) -> Path:
    """Export ``model`` with ``config`` into ``directory`` (:func:`save_backbone`) and write its model card from
    the config as exported; returns the export's directory."""
    export = save_backbone(model, config, directory, half=half)
    (export / "MODEL_CARD.md").write_text(model_card(read_backbone_config(export)))
    return export
