"""Train from scratch or fine-tune a timm ViT: the backbone that the agents learn to prune.

Reads the ``train`` split (minus the seeded ``val`` subset), picks nothing on ``test``, and reports
test accuracy once at the end for the model card. Needs torch + timm + safetensors only (no Ray), so it
runs on any GPU box. Decoded images live in one uint8 tensor on the device and are augmented there, per
image (envs/vit/augment.py). A training step neither copies from the host nor reads a value back, so on a GPU
the host queues steps ahead and the device sets the pace (TrainingStep in this file says how).

    python backbone.py --data-dir ../shared/data --output-dir runs/backbone
    python backbone.py --output-dir runs/backbone --resume      # continue after --time-limit or a crash
    python backbone.py --data-dir ../shared/data --output-dir runs/backbone_fast --batch-size 512 --compile
                                                # on a GPU: larger batches, compiled
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from cli import (
    OneLineParser,
    add_data_access_arguments,
    check_output_dir,
    code_commit,
    command_words,
    data_access,
    duration_in,
    given_flags,
    non_negative_float,
    non_negative_int,
    output_directory,
    positive_float,
    positive_int,
    random_seed,
    resume_command,
    run_command,
    versions_line,
)
from envs.atomic_file import replaced_atomically
from envs.errors import UsageError
from envs.vit.augment import NUM_BINS, RandAugment, random_crop_flip
from envs.vit.backbone_checkpoint import (
    CONFIG_FILE,
    RUN_EXPORT_DIR,
    CheckpointError,
    create_vit,
    load_backbone,
    normalize,
    repository_relative,
    save_backbone,
)
from envs.vit.data import (
    DATASETS,
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_SIZE,
    DataError,
    ImageSplit,
    StreamedImages,
    check_recorded_data_dir,
    class_difference,
    default_data_dir,
    errors_of_workers,
    held_out_fingerprint,
    load_split,
    split_class_names,
    training_split_size,
)
from envs.vit.device import DEVICE_CHOICES, autocast_to, describe_device, resolve_device
from envs.vit.flops import ViTSpec, unpruned_gflops
from envs.vit.held_out import same_images, val_drawn_from
from envs.vit.staged_vit import check_prunable
from envs.vit.timing import images_per_second

STATE_FILE = "train_state.pt"
STREAM_WORKERS = min(8, os.cpu_count() or 1)  # processes decoding a streamed training split ahead
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_EPOCHS = 185
THROUGHPUT_BATCH = 256  # images per batch of the eval throughput the model card reports


def parse_kwargs(pairs: list[str]) -> dict:
    """``["img_size=32", "patch_size=4"]`` -> ``{"img_size": 32, "patch_size": 4}``."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"model kwarg {pair!r} is not key=value")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def randaug_magnitude(text: str) -> int:
    """An argparse ``type``: one of RandAugment's magnitude bins, 0 to 30."""
    value = non_negative_int(text)
    if value >= NUM_BINS:
        raise argparse.ArgumentTypeError(f"must be at most {NUM_BINS - 1} (torchvision's bins), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (default vit_tiny_patch16_224)")
    p.add_argument("--model-kwargs", nargs="*", default=["img_size=32", "patch_size=4", "drop_path_rate=0.1"],
                   metavar="K=V", help="timm create_model kwargs (default: img_size=32 patch_size=4 "
                                      "drop_path_rate=0.1); given, they replace the defaults: add "
                                      "drop_path_rate=0.1 to keep stochastic depth")
    p.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (from the Hugging Face Hub, or its local cache)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the weights of a backbone this script exported (e.g. reference/vit_tiny_cifar10), "
                        "trained on the same splits, with a fresh warm-up and cosine schedule: a second cycle that "
                        "lengthens its training without its optimiser state")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="cifar10 (the default) and cifar100 as torchvision or the README lays them out; folder: "
                        "train/ and test/ (or val/) class directories under --data-dir, or .tars of them")
    p.add_argument("--data-dir", default=default_data_dir(), help="where the data set lives (see README)")
    add_data_access_arguments(p)
    p.add_argument("--val-size", type=positive_int, default=DEFAULT_VAL_SIZE,
                   help=f"training images held out as the validation split (default {DEFAULT_VAL_SIZE}); the "
                        f"checkpoint records it, and train.py and evaluate.py hold out the same")
    p.add_argument("--split-seed", type=random_seed, default=DEFAULT_SPLIT_SEED,
                   help=f"seed of the train/validation split (default {DEFAULT_SPLIT_SEED})")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="train and test on a seeded subset of N images of their splits, and validate on the first N "
                        "held-out images, the split the checkpoint records (smoke tests)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"schedule length (default {DEFAULT_EPOCHS}); on --resume, a new length shortens or extends "
                        f"the schedule")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per step (default 256)")
    p.add_argument("--lr", type=positive_float, default=3e-3,
                   help="peak learning rate for batch 512, scaled linearly (default 3e-3)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05, help="AdamW's (default 0.05)")
    p.add_argument("--warmup-epochs", type=non_negative_float, default=10,
                   help="linear warm-up before the cosine schedule (default 10)")
    p.add_argument("--label-smoothing", type=non_negative_float, default=0.1, help="in [0, 1) (default 0.1)")
    p.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha (default 0.8; 0 = off)")
    p.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha (default 1.0; 0 = off)")
    p.add_argument("--randaug", type=non_negative_int, default=2, help="RandAugment ops per image (default 2; 0 = off)")
    p.add_argument("--randaug-magnitude", type=randaug_magnitude, default=9,
                   help="0 to 30: m/30 of each op's largest change, as torchvision's RandAugment (default 9; refused "
                        "with --randaug 0, which builds none)")
    p.add_argument("--seed", type=random_seed, default=0,
                   help="seed of the initial weights, augmentation and batch order (default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_CHOICES)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="train and validate in bf16 autocast (default: on a GPU; --no-amp: float32). A CPU runs "
                        "float32 by default: without native bf16 (AVX2 only) autocast made an epoch 20 times as long")
    p.add_argument("--compile", action="store_true",
                   help="train the model through torch.compile: compiling takes about a minute when the run (or a "
                        "--resume) starts and pays off on long GPU runs; the weights saved are the same")
    p.add_argument("--time-limit", type=duration_in("s"), default=None, metavar="SECONDS",
                   help="stop (resumably) after the first epoch that ends past this many seconds (or a duration "
                        "with a unit: 20m, 1.5h)")
    p.add_argument("--time-budget", type=duration_in("s"), default=None, metavar="SECONDS",
                   help="train as many epochs as fit in this many seconds (or 20m, 1.5h) from this process's start "
                        "(a --resume's budget starts anew), the test reading and export included: "
                        "the schedule's length is set from the second epoch's measured time (the first pays for "
                        "compiling; where no second is scheduled, from the first's, then again from the second's), "
                        "replacing --epochs; two epochs' time, and a minute more with --compile, is kept for the test "
                        "reading and export")
    p.add_argument("--save-every", type=positive_int, default=1, metavar="EPOCHS",
                   help="write train_state.pt (weights, optimiser and random streams: 66 MB for the reference) every "
                        "this many epochs, at a --time-limit stop and at the end; a crash loses at most this many")
    p.add_argument("--output-dir", type=output_directory, default="runs/backbone",
                   help="the run's directory (default runs/backbone): the training state (train_state.pt), and the "
                        "checkpoint with its model card in OUTPUT_DIR/backbone")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in OUTPUT_DIR")
    p.add_argument("--half", action="store_true", default=True, help="export float16 weights (default)")
    p.add_argument("--full-precision", dest="half", action="store_false", help="export float32 weights")
    return p


def make_mixup_and_loss(args: argparse.Namespace, num_classes: int) -> tuple[Mixup | None, torch.nn.Module]:
    """timm's batch Mixup/CutMix (None when both alphas are 0) and the loss that fits its targets."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None, LabelSmoothingCrossEntropy(args.label_smoothing)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                  num_classes=num_classes)
    return mixup, SoftTargetCrossEntropy()


@dataclasses.dataclass
class TrainingStep:
    """What one training step uses, built once before the loop by :func:`build_training_step`.

    A step neither copies a host tensor to the device nor reads a device value back, so on a GPU the host
    queues steps ahead and the device sets the pace: the images are on the device already, or, for a streamed
    split, arrive in page-locked memory, whose copy does not wait (:func:`epoch_batches`); the augmentation draws
    from ``generator``, which lives on the training device (``envs.vit.augment``) and is saved for ``--resume``
    with torch's and numpy's generators; normalize's mean and std are cached on the device; timm's mixup draws
    its lambda and box with numpy on the host, which reach the kernels as Python numbers; AdamW is fused,
    gradient clipping works on the whole list of gradients at once, the scheduler sets Python numbers, and the
    loss is returned on the device, summed there by :func:`run_epoch` and read once an epoch.
    """

    model: torch.nn.Module  # what runs forward and backward: the model, or torch.compile's wrapper of it
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    criterion: torch.nn.Module
    mixup: Mixup | None
    randaugment: RandAugment | None
    generator: torch.Generator  # on the training device: every random draw of the augmentation
    config: dict  # the mean and std that normalize reads
    amp: bool

    def augment(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, 3, H, W]`` -> normalised, augmented float images and (soft, with mixup) targets."""
        x = random_crop_flip(images, 4, self.generator)
        if self.randaugment is not None:
            x = self.randaugment(x, self.generator)
        x = normalize(x, self.config)
        return self.mixup(x, labels) if self.mixup is not None else (x, labels)

    def optimize(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One AdamW step (in bf16 autocast if ``amp``, gradients clipped at norm 1); returns the detached loss,
        unsynced."""
        with autocast_to(x.device, torch.bfloat16 if self.amp else torch.float32):
            loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, update: int) -> torch.Tensor:
        """Augment a batch, optimise on it, and set the learning rate that follows ``update`` updates."""
        loss = self.optimize(*self.augment(images, labels))
        self.scheduler.step_update(update)
        return loss


def build_training_step(args: argparse.Namespace, model: torch.nn.Module, num_classes: int, steps_per_epoch: int,
                        config: dict, device: torch.device) -> TrainingStep:
    """The recipe of ``args`` for ``model`` (on ``device``): fused AdamW with the learning rate scaled from batch
    512, warm-up then cosine per update, mixup/cutmix and its loss, RandAugment, the augmentation generator
    seeded with ``--seed``; with ``--compile`` the model trains through ``torch.compile``, whose wrapper shares
    the model's parameters (so ``model.state_dict()`` stays the one to save)."""
    lr = args.lr * args.batch_size / 512
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=args.weight_decay, fused=True)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=lr * 1e-2,
                                  warmup_t=int(args.warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 1e-3,
                                  t_in_epochs=False)
    mixup, criterion = make_mixup_and_loss(args, num_classes)
    return TrainingStep(model=torch.compile(model) if args.compile else model, optimizer=optimizer,
                        scheduler=scheduler, criterion=criterion, mixup=mixup,
                        randaugment=RandAugment(args.randaug, args.randaug_magnitude) if args.randaug > 0 else None,
                        generator=torch.Generator(device).manual_seed(args.seed), config=config,
                        amp=resolve_amp(args.amp, device))


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """Whether a run trains in bf16 autocast: as ``--amp``/``--no-amp`` say, else on a GPU only. On a CPU
    without native bf16, autocast emulates it: the tiny and the reference ViT-Tiny trained 2.5 and 20 times
    slower than in float32 on a 2-core AVX2 CPU."""
    return device.type == "cuda" if amp is None else amp


def restore_generator(generator: torch.Generator, state: dict, reseed: int) -> None:
    """Continue the augmentation stream that ``train_state.pt`` saved. A stream saved on another kind of device
    (a state that names none drew on the CPU) cannot continue on this one, so the rest of
    the run draws from a fresh stream seeded with ``reseed`` instead, and says so."""
    saved_on = state.get("generator_device", "cpu")
    if saved_on == generator.device.type:
        generator.set_state(state["generator"])
        return
    generator.manual_seed(reseed)
    print(f"note: the saved augmentation stream was drawn on {saved_on}; on {generator.device.type} the rest of "
          f"the run draws a new one (seed {reseed}), so it will not repeat an uninterrupted run's augmentation")


PROGRESS_LINE_EVERY_S = 60.0
"""How often an epoch that is not shown on a terminal prints a line of its progress (a CPU epoch takes minutes)."""


def run_epoch(step: TrainingStep, images: torch.Tensor | StreamedImages, labels: torch.Tensor, batch_size: int,
              steps: int, updates_done: int, progress: str | None = None) -> torch.Tensor:
    """``steps`` steps over ``images`` in an order drawn from the step's generator; returns the summed loss on
    the device (reading it waits for the device, so the caller does that once an epoch). With ``progress`` (a
    name), a progress bar on a terminal shows the loss every 20 steps, and elsewhere (a log) a line gives the
    steps done and the loss once every :data:`PROGRESS_LINE_EVERY_S`; each waits for the device."""
    device = labels.device
    order = torch.randperm(len(labels), generator=step.generator, device=device)
    on_terminal = progress is not None and sys.stderr.isatty()
    bar = tqdm(epoch_batches(images, order, batch_size, steps, pin_memory=device.type == "cuda"), total=steps,
               desc=progress, leave=False, disable=not on_terminal)
    loss_sum = torch.zeros((), device=device)
    last_line = time.monotonic()
    for i, (batch, batch_images) in enumerate(bar):
        loss = step(batch_images.to(device, non_blocking=True), labels[batch], updates_done + i + 1)
        loss_sum += loss
        if on_terminal and i % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        elif progress is not None and not on_terminal and time.monotonic() - last_line >= PROGRESS_LINE_EVERY_S:
            print(f"{progress}: step {i + 1}/{steps}, loss {loss.item():.4f}", flush=True)
            last_line = time.monotonic()
    return loss_sum


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: ImageSplit, config: dict, device: torch.device, amp: bool,
             batch_size: int = 512) -> float:
    """Top-1 accuracy on ``split``, counted on the device and read once."""
    model.eval()
    labels = split.labels.to(device)
    correct, start = torch.zeros((), dtype=torch.long, device=device), 0
    for images in split.batches(batch_size):
        x = normalize(images.to(device), config)
        with autocast_to(device, torch.bfloat16 if amp else torch.float32):
            correct += (model(x).argmax(-1) == labels[start:start + len(images)]).sum()
        start += len(images)
    return correct.item() / len(split)


def epoch_batches(images: torch.Tensor | StreamedImages, order: torch.Tensor, batch_size: int, steps: int,
                  pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch's ``steps`` batches in ``order``: ``(indices [B], uint8 images [B, 3, S, S])``, the indices
    where ``order`` lies. Decoded images are indexed where they lie (the device); a streamed split is decoded
    ahead in DataLoader workers, which read the order from the host (one copy an epoch) and, with
    ``pin_memory``, hand over page-locked batches that copy to a GPU without waiting for it."""
    order = order[:steps * batch_size]
    batches = order.split(batch_size)
    if isinstance(images, torch.Tensor):
        for batch in batches:
            yield batch, images[batch]
        return
    indices = [batch.tolist() for batch in order.cpu().split(batch_size)]
    loader = images.loader(batch_sampler=indices, num_workers=STREAM_WORKERS, pin_memory=pin_memory,
                           generator=torch.Generator())  # leaves the global RNG to the training
    with errors_of_workers():
        yield from zip(batches, loader, strict=True)


@torch.no_grad()
def eval_images_per_second(model: torch.nn.Module, config: dict, device: torch.device, repeats: int = 5) -> float:
    """Median eval throughput in float32 on one batch of :data:`THROUGHPUT_BATCH` random images, after a warm-up
    pass (the card's figure)."""
    model.eval()
    size = config["input_size"]
    return images_per_second(model, torch.randn(THROUGHPUT_BATCH, 3, size, size, device=device), THROUGHPUT_BATCH,
                             repeats)


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


def read_init_from(directory: str) -> tuple[torch.nn.Module, dict]:
    """The exported backbone ``--init-from`` names, read before the data is decoded so that a bad one is refused
    at once."""
    try:
        return load_backbone(directory)
    except CheckpointError as error:
        raise UsageError(f"--init-from {directory}: {error}") from None


def init_from_export(model: torch.nn.Module, directory: str, init_export: tuple[torch.nn.Module, dict],
                     config: dict) -> dict:
    """Load the weights of ``init_export``, the exported backbone in ``directory`` (:func:`read_init_from`), into
    ``model`` and return what the model card says of it. The weights are the export's (float16 unless it was
    exported with --full-precision). Refused unless it is the same model on the same classes, input and
    validation split: a backbone that trained on other splits has seen this run's validation images."""
    export_model, export_config = init_export
    for key in ("model_name", "model_kwargs", "class_names", "input_size", "mean", "std"):
        if export_config.get(key) != config[key]:
            raise UsageError(f"--init-from {directory}: its {key} is {export_config.get(key)!r}, this run's is "
                             f"{config[key]!r}")
    held_out, recorded = export_config.get("split_sizes", {}).get("val"), export_config.get("val_fingerprint")
    drawn_from = val_drawn_from(export_config)
    if held_out != config["split_sizes"]["val"] or recorded is None:
        why = ("it records none" if recorded is None else f"it recorded a validation split of {held_out} images, "
               f"this run's has {config['split_sizes']['val']} (--val-size, --limit)")
    elif drawn_from not in (None, config["val_drawn_from"]):
        why = f"it drew it from {drawn_from} training images, this run from {config['val_drawn_from']}"
    elif not same_images(recorded, config["val_fingerprint"]):
        why = "it held out other images: another --split-seed or another copy of the data set"
    else:
        why = None
    if why is not None:
        raise UsageError(f"--init-from {directory}: its val_fingerprint is not this run's ({why}), so it may have "
                         f"trained on this run's validation images")
    model.load_state_dict(export_model.state_dict())
    return {"path": repository_relative(directory), "epochs": export_config.get("recipe", {}).get("epochs"),
            "test_accuracy": export_config.get("test_accuracy")}


def save_state(path: Path, state: dict) -> None:
    """Write the resumable training state (``--resume`` reads it) in one step: a crash while saving leaves the
    previous state whole."""
    with replaced_atomically(path) as staging:
        torch.save(state, staging)


def read_state(path: Path) -> dict:
    """The training state ``--resume`` goes on from; a damaged file is one error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load's errors on a damaged file: RuntimeError, EOFError, UnpicklingError, ...
        raise UsageError(f"cannot read {path} ({type(error).__name__}: {error}): the run cannot be resumed; start "
                         f"it again with --overwrite, or a new run with --init-from its export") from None


COMPILE_RESERVE_S = 60.0
"""What ``--time-budget`` keeps for compiling the model for the test reading under ``--compile``."""


def epochs_within(seconds_left: float, epoch_seconds: float, epochs_done: int, compiled: bool) -> int:
    """The schedule length that ends within ``seconds_left`` more seconds of epochs of ``epoch_seconds``, after
    ``epochs_done`` (at least the epochs done), with two epochs' time kept for the test reading and the export,
    and :data:`COMPILE_RESERVE_S` more when the model is ``compiled`` for them."""
    reserve = 2 * epoch_seconds + (COMPILE_RESERVE_S if compiled else 0.0)
    return epochs_done + max(0, int((seconds_left - reserve) // epoch_seconds))


# What a resumed run takes from its command line: how long and where it runs, and how it reaches the data (the
# data directory only when given, so that a run moved to another machine finds its data there). Every other
# flag is the recipe it recorded.
RESUME_FLAGS = ("time_limit", "time_budget", "save_every", "device", "compile", "output_dir", "download",
                "memory_budget_mb")


def spelled_setting(flag: str, value: Any) -> tuple[str, str]:
    """How a command line says that ``flag`` (an argparse ``dest``) is ``value``, as (its option, the setting):
    :func:`cli.command_words` as one string, or the option left out (``without --pretrained``, ``without
    --limit``)."""
    option, words = command_words(build_parser(), flag, value)
    return option, " ".join(words) or f"without {option}"


def go_on_command(args: argparse.Namespace, given: Collection[str]) -> str:
    """The command that goes on with the run in ``args.output_dir`` after a stop or an interrupt: ``--resume``,
    with the flags of the command line that are not recorded (those of :data:`RESUME_FLAGS` and ``--data-dir``
    among ``given``, :func:`given_flags`), as ``args`` has them; a resumed run takes those from its own command
    line, so without them it would go on without its ``--time-budget``, ``--device``, ``--compile``, ... The
    schedule's length goes too where it was given or changed since the run began: the state on disk records it
    only from its next save."""
    carried = [flag for flag in (*RESUME_FLAGS, "data_dir") if flag in given and flag != "output_dir"]
    if "epochs" in given or getattr(args, "schedule_changes", []):
        carried.append("epochs")
    return resume_command("backbone.py", build_parser(), args, carried)


def resumed_args(args: argparse.Namespace, state: dict, given: Collection[str]) -> argparse.Namespace:
    """The settings of a run resumed from ``state`` (its train_state.pt) by the command line ``args``, whose
    flags named on it are ``given``: the recorded recipe, with :data:`RESUME_FLAGS`, a given ``--data-dir``
    and a longer or shorter ``--epochs`` from ``args`` (a changed schedule length is recorded). A recipe
    flag given with another value than the recorded one is refused rather than ignored."""
    saved = dict(state["args"])
    if "amp" not in saved:  # a state that records "no_amp" instead: autocast unless it is set
        saved["amp"] = not saved.pop("no_amp")
    for flag in sorted(given):
        value = getattr(args, flag)
        if flag in (*RESUME_FLAGS, "data_dir", "epochs", "resume", "overwrite") or value == saved.get(flag, value):
            continue
        (given_option, _), (_, recorded) = spelled_setting(flag, value), spelled_setting(flag, saved[flag])
        raise UsageError(f"--resume continues the run it recorded ({recorded}): {given_option} cannot change it "
                         f"(start a new run with --init-from its export instead)")
    epochs = args.epochs if args.epochs is not None else saved["epochs"]
    done = state["epoch"]
    finished = any(reading["epoch"] == done for reading in state.get("test_readings", []))
    if epochs < done or (epochs == done and finished):
        raise UsageError(f"--resume: the run has trained {done} epochs{' and read the test split' if finished else ''}"
                         f": pass --epochs more than {done} to lengthen it")
    data_dir = args.data_dir if "data_dir" in given else saved["data_dir"]
    if "data_dir" not in given:
        check_recorded_data_dir(data_dir)
    schedule = saved.get("schedule_changes", [])
    if epochs != saved["epochs"]:
        schedule = [*schedule, {"at_epoch": state["epoch"], "epochs": epochs}]
        print(f"schedule length changed from {saved['epochs']} to {epochs} epochs at epoch {state['epoch']}")
    return argparse.Namespace(**{**saved, **{flag: getattr(args, flag) for flag in RESUME_FLAGS}, "resume": True,
                                 "epochs": epochs, "schedule_changes": schedule, "data_dir": data_dir})


RESUMED_DATA = ("class_names", "split_sizes", "val_drawn_from", "val_fingerprint")  # a resumed run's data repeats


def check_same_data(recorded: Mapping[str, Any] | None, config: Mapping[str, Any], data_dir: str) -> None:
    """Refuse to resume on other data than the run trained on (a ``--data-dir`` given on resume is meant for a run
    moved to another machine): other classes would relabel what it learned, another validation split would hold
    images it trained on. ``recorded``: the train_state's ``data`` (None where a state lacks it: nothing to check)."""
    if recorded is None:
        return
    changed = [key for key in RESUMED_DATA  # a recorded state may lack val_drawn_from
               if key != "val_fingerprint" and recorded.get(key, config[key]) != config[key]]
    if not same_images(config["val_fingerprint"], recorded["val_fingerprint"]):
        changed.append("validation images")
    if changed:
        raise DataError(f"--resume: the data in {data_dir} is not what the run trained on (its {', '.join(changed)} "
                        f"differ): point --data-dir at a copy of that data set, or start a new run")


def run_one_level_up(out: Path) -> str:
    """What to add to an error about ``--output-dir out`` when ``out`` is the export of the backbone.py run in the
    directory above (the export is the directory train.py and evaluate.py take): that run's directory."""
    if out.name == RUN_EXPORT_DIR and (out.parent / STATE_FILE).exists():
        return f" ({out} is the export of the run in {out.parent}: pass --output-dir {out.parent})"
    return ""


def train(args: argparse.Namespace, given: Collection[str]) -> None:
    """Train (or resume, ``args.resume``) the backbone ``args`` describes; ``given`` names the flags the
    command line set (:func:`given_flags`), which a resumed run checks against its recorded recipe."""
    started = time.time()  # --time-budget counts from here: decoding the data and building the model take a while
    commit = code_commit()  # the code this (re)start runs, not what the tree holds when it ends
    device = resolve_device(args.device)
    out = Path(args.output_dir).expanduser()
    check_run_directory(args, out)
    state_path = out / STATE_FILE
    state = read_state(state_path) if args.resume else None
    args = run_settings(args, state, given, device)
    geometry = model_geometry(args)
    init_export = read_init_from(args.init_from) if state is None and args.init_from is not None else None
    train_split, val_split = training_data(args, geometry.input_size, device)
    config = data_config(args, geometry, train_split, val_split)
    if state is not None:
        check_same_data(state.get("data"), config, args.data_dir)
    num_classes = config["num_classes"]
    model = create_vit(args.model, num_classes, geometry.kwargs,
                       pretrained=args.pretrained and state is None).to(device)
    if init_export is not None:
        args.init_summary = init_from_export(model, args.init_from, init_export, config)
        del init_export
    batch_size = fitted_batch_size(args, len(train_split))
    args.batch_size = batch_size  # the learning rate is scaled for the batch that trains, and the recipe records it
    steps_per_epoch = len(train_split) // batch_size
    step = build_training_step(args, model, num_classes, steps_per_epoch, config, device)

    history, start_epoch, test_readings = [], 0, []
    snapshot = state  # what train_state.pt holds now
    if state is not None:
        history, start_epoch, test_readings = state["history"], state["epoch"], state.get("test_readings", [])
        restore_state(state, model, step, reseed=args.seed + start_epoch, device=device)
        print(f"resuming {out} at epoch {start_epoch}/{args.epochs}")
    out.mkdir(parents=True, exist_ok=True)

    streamed = isinstance(train_split.images, StreamedImages)
    images = train_split.images if streamed else train_split.images.to(device)
    labels = train_split.labels.to(device)
    process_start = time.time()
    began = process_start - (history[-1]["seconds"] if history else 0.0)  # elapsed time spans resumes
    epoch = start_epoch
    while epoch < args.epochs:  # --time-budget may change args.epochs
        model.train()
        loss_sum = run_epoch(step, images, labels, batch_size, steps_per_epoch, epoch * steps_per_epoch,
                             progress=f"epoch {epoch + 1}/{args.epochs}")
        mean_loss = loss_sum.item() / steps_per_epoch
        val_acc = accuracy(model, val_split, config, device, amp=args.amp)
        history.append({"epoch": epoch + 1, "loss": mean_loss, "val_accuracy": val_acc,
                        "seconds": time.time() - began})
        print(f"epoch {epoch + 1}/{args.epochs} loss {mean_loss:.4f} "
              f"val {100 * val_acc:.2f}% ({time.time() - began:.0f}s)", flush=True)
        if args.time_budget is not None:
            fit_time_budget(args, step, history, epoch, start_epoch, started, steps_per_epoch)
        snapshot = training_snapshot(args, model, step, device, history, epoch, test_readings, config)
        over_time = args.time_limit is not None and time.time() - process_start > args.time_limit
        stopping = over_time and epoch + 1 < args.epochs
        if stopping or (epoch + 1) % args.save_every == 0:  # the last epoch's is saved with the test reading
            save_state(state_path, snapshot)
        if stopping:
            print(f"time limit reached after epoch {epoch + 1}; continue with {go_on_command(args, given)}")
            return
        epoch += 1

    print("reading the test split once, for the model card", flush=True)
    test_acc, test_size = read_test_accuracy(args, model, config, device)
    test_readings = [*test_readings, {"epoch": args.epochs, "test_accuracy": test_acc}]
    if snapshot is not None:  # a later --resume --epochs must know the test split has been read
        save_state(state_path, {**snapshot, "test_readings": test_readings})
    config.update(split_sizes={**config["split_sizes"], "test": test_size}, recipe=run_recipe(args, history, device),
                  history=history, test_accuracy=test_acc, test_readings=test_readings,
                  **measurements(model, config, device), commit=commit, versions=versions_line())
    export = export_with_card(model, config, out / RUN_EXPORT_DIR, half=args.half)
    print(f"test {100 * test_acc:.2f}% on {test_size} images, {config['gflops']:g} GFLOPs a forward: exported to "
          f"{export}")


def check_run_directory(args: argparse.Namespace, out: Path) -> None:
    """Refuse, before anything is read or built, an ``--output-dir`` that does not hold what ``--resume`` or
    ``--overwrite`` (or neither) expects: a run to continue, one to replace, or nothing of a run. A
    ``UsageError`` that names the flag to pass."""
    check_output_dir(out, str(out))
    state_path = out / STATE_FILE
    exported = (out / RUN_EXPORT_DIR / CONFIG_FILE).is_file()
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run; --overwrite replaces it: pass one of them")
    if not (args.resume or args.overwrite):
        if state_path.exists():
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        if exported:  # a finished run's export alone
            raise UsageError(f"{out} already holds an exported backbone ({out / RUN_EXPORT_DIR}): pass --overwrite "
                             f"to replace it, or start from it with --init-from {out / RUN_EXPORT_DIR} in another "
                             f"--output-dir")
    if args.resume and not state_path.exists():
        raise UsageError(f"nothing to resume: {state_path} does not exist{run_one_level_up(out)}")
    staged = f".{STATE_FILE}.tmp"  # what a save killed before it finished leaves (envs.atomic_file)
    if (not (state_path.exists() or exported) and out.is_dir()
            and any(path.name != staged for path in out.iterdir())):
        raise UsageError(f"{out} is not empty and holds no backbone.py run: choose another --output-dir"
                         f"{run_one_level_up(out)}")


def run_settings(args: argparse.Namespace, state: dict | None, given: Collection[str],
                 device: torch.device) -> argparse.Namespace:
    """The settings the run trains with: a resumed run's recorded recipe (:func:`resumed_args`), else the command
    line's with the default schedule length; the data directory absolute and ``amp`` resolved for ``device``,
    both as the state records them. Seeds torch's and numpy's generators, and warns of a warm-up that fills the
    whole schedule."""
    if state is not None:
        args = resumed_args(args, state, given)
    elif args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    if state is None or "data_dir" in given:  # recorded absolute: a resumed run may start in another directory
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if state is None and args.time_budget is None and args.warmup_epochs >= args.epochs:
        warnings.warn(f"--warmup-epochs {args.warmup_epochs:g} is not fewer than --epochs {args.epochs}: the learning "
                      f"rate never leaves its warm-up (pass a shorter --warmup-epochs)", stacklevel=2)
    args.amp = resolve_amp(args.amp, device)  # recorded resolved: a resumed run keeps it on any device
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # timm's mixup draws from numpy's global generator
    return args


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """What the data pipeline needs of the model before the data is read: its timm kwargs, the side of its square
    input in pixels, and the mean and std that normalise it."""

    kwargs: dict[str, Any]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_geometry(args: argparse.Namespace) -> ModelGeometry:
    """The geometry of the model ``args`` names, read from a probe model of one class built before the data is
    read: a model that train.py and evaluate.py could not prune is refused then, not after training. The mean
    and std are timm's for the model, or CIFAR's own for a model trained on CIFAR from scratch."""
    kwargs = parse_kwargs(args.model_kwargs)
    probe = create_vit(args.model, 1, kwargs)
    try:
        check_prunable(probe)
    except UsageError as error:
        raise UsageError(f"--model {args.model} {' '.join(args.model_kwargs)}: {error}") from None
    input_size = square_input_size(probe, kwargs)
    mean, std = tuple(probe.default_cfg.get("mean", CIFAR_MEAN)), tuple(probe.default_cfg.get("std", CIFAR_STD))
    if not args.pretrained and args.dataset.startswith("cifar"):
        mean, std = CIFAR_MEAN, CIFAR_STD  # from scratch: the data set's own statistics
    return ModelGeometry(kwargs=kwargs, input_size=input_size, mean=mean, std=std)


def training_data(args: argparse.Namespace, input_size: int,
                  device: torch.device) -> tuple[ImageSplit, ImageSplit]:
    """The training and validation splits ``args`` names, at ``input_size``, the validation images decoded on
    ``device`` (they are read every epoch), and one line on stdout of what the data turned out to be. A
    ``DataError`` where the test split has other classes: labels are class indices, so they would name other
    classes, and the test split is read only after training."""
    split_kw = dict(data_dir=args.data_dir, input_size=input_size, val_size=args.val_size,
                    seed=args.split_seed, limit=args.limit, **data_access(args))
    train_split = load_split(args.dataset, "train", **split_kw)
    test_classes = split_class_names(args.dataset, "test", args.data_dir, args.download)
    if test_classes != train_split.class_names:
        raise DataError(f"the test split's classes are not the training split's "
                        f"({class_difference(test_classes, train_split.class_names)}): fix the test split first")
    # With --limit, validation reads the first --limit images of the held-out order, not a subset drawn from all
    # of it: that is the split the config records (split_sizes.val), which train.py and evaluate.py hold out.
    val_split = load_split(args.dataset, "val", **{**split_kw, "val_size": min(args.limit or args.val_size,
                                                                               args.val_size), "limit": None})
    if not isinstance(val_split.images, StreamedImages):
        val_split = dataclasses.replace(val_split, images=val_split.images.to(device))
    num_classes = len(train_split.class_names)
    shown = ", ".join(train_split.class_names[:10]) + (", ..." if num_classes > 10 else "")
    print(f"data: {args.dataset} in {args.data_dir}: {num_classes} classes ({shown}); {len(train_split)} training "
          f"and {len(val_split)} validation images")
    return train_split, val_split


def data_config(args: argparse.Namespace, geometry: ModelGeometry, train_split: ImageSplit,
                val_split: ImageSplit) -> dict:
    """The export's config as far as it is known before training: the model, its input, its classes, and the
    splits, with what names the held-out one (its seed, the count of training images it was drawn from and the
    fingerprint of its images) for the commands that score the backbone on it."""
    return {"model_name": args.model, "model_kwargs": geometry.kwargs, "num_classes": len(train_split.class_names),
            "class_names": list(train_split.class_names), "input_size": geometry.input_size,
            "mean": list(geometry.mean), "std": list(geometry.std), "dataset": args.dataset,
            "split_sizes": {"train": len(train_split), "val": len(val_split)},
            "split_seed": args.split_seed,
            "val_fingerprint": held_out_fingerprint(args.dataset, args.data_dir, geometry.input_size, len(val_split),
                                                    args.split_seed, args.download),
            "val_drawn_from": training_split_size(args.dataset, args.data_dir, args.download)}


def fitted_batch_size(args: argparse.Namespace, train_size: int) -> int:
    """The images of a step: ``--batch-size``, or all ``train_size`` training images where they are fewer,
    less one where mixup needs an even count; a note on stderr where it is not the ``--batch-size`` asked for.
    The caller records it in ``args``: the learning rate is scaled for the batch that trains, and the recipe
    records it."""
    batch_size = min(args.batch_size, train_size)  # a split smaller than a batch trains in one
    if args.mixup > 0 or args.cutmix > 0:
        batch_size -= batch_size % 2  # timm's mixup pairs each image with another of its batch
    if batch_size == 0:
        raise DataError(f"{train_size} training image: mixup and cutmix need at least two")
    if batch_size != args.batch_size:
        print(f"note: --batch-size {args.batch_size} is more than the {train_size} training images: steps of "
              f"{batch_size} images, the learning rate scaled for them", file=sys.stderr)
    return batch_size


def restore_state(state: dict, model: torch.nn.Module, step: TrainingStep, reseed: int,
                  device: torch.device) -> None:
    """Continue where ``state`` (train_state.pt) stopped: the weights, the optimiser and every random stream, so
    that a resumed run draws what an uninterrupted one would (:func:`restore_generator` says where it cannot)."""
    model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    restore_generator(step.generator, state, reseed=reseed)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":  # stochastic depth draws from it on a GPU
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if "numpy_rng" in state:  # mixup's generator, where the state has it
        np.random.set_state(state["numpy_rng"])


def fit_time_budget(args: argparse.Namespace, step: TrainingStep, history: list[dict], epoch: int, start_epoch: int,
                    started: float, steps_per_epoch: int) -> None:
    """Set the schedule's length (``args.epochs`` and the cosine schedule) to the epochs that fit in
    ``--time-budget`` seconds from ``started`` (:func:`epochs_within`), after ``epoch`` (counted from 0) ends. It is
    measured on the second epoch this process runs, after ``start_epoch`` (the first pays for compiling), or on
    the first where no second is scheduled (then again on the second, if the first plans one). A change is
    printed and recorded in ``args.schedule_changes`` for the card."""
    measured = epoch == start_epoch + 1 or (epoch == start_epoch and epoch + 1 == args.epochs)
    if not measured:
        return
    epoch_seconds = history[-1]["seconds"] - (history[-2]["seconds"] if len(history) > 1 else 0.0)
    epochs = epochs_within(args.time_budget - (time.time() - started), epoch_seconds, epoch + 1, args.compile)
    if epochs != args.epochs:
        print(f"--time-budget {args.time_budget:g} s: {epochs} epochs in all, from epoch {epoch + 1}'s "
              f"{epoch_seconds:.1f} s", flush=True)
        args.schedule_changes = [*getattr(args, "schedule_changes", []),
                                 {"at_epoch": epoch + 1, "epochs": epochs, "by": "--time-budget"}]
        args.epochs = epochs
        step.scheduler.t_initial = epochs * steps_per_epoch
        if args.warmup_epochs >= epochs:
            warnings.warn(f"--warmup-epochs {args.warmup_epochs:g} is not fewer than the {epochs} epochs that fit in "
                          f"--time-budget {args.time_budget:g} s: the learning rate never leaves its warm-up (pass a "
                          f"shorter --warmup-epochs, or a longer --time-budget: 20m, 1.5h)", stacklevel=2)


def training_snapshot(args: argparse.Namespace, model: torch.nn.Module, step: TrainingStep, device: torch.device,
                      history: list[dict], epoch: int, test_readings: list[dict], config: dict) -> dict:
    """What train_state.pt holds after ``epoch`` (counted from 0): the weights, the optimiser, every random
    stream, the history, the settings and the data the run trained on, all that ``--resume`` needs to go on as
    if it had not stopped."""
    return {"model": model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "generator": step.generator.get_state(), "generator_device": device.type,
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "history": history, "epoch": epoch + 1, "args": vars(args), "test_readings": test_readings,
            "data": {key: config[key] for key in RESUMED_DATA}}


def read_test_accuracy(args: argparse.Namespace, model: torch.nn.Module, config: dict,
                       device: torch.device) -> tuple[float, int]:
    """The trained model's top-1 accuracy on the test split, in float32, and the count of test images: read once
    a run has finished, for the model card."""
    test_split = load_split(args.dataset, "test", data_dir=args.data_dir, input_size=config["input_size"],
                            limit=args.limit, **data_access(args))
    return accuracy(model, test_split, config, device, amp=False), len(test_split)


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


def export_with_card(model: torch.nn.Module, config: dict, directory: Path, half: bool) -> Path:
    """Export ``model`` with ``config`` into ``directory`` (:func:`save_backbone`) and write its model card from
    the config as exported; returns the export's directory."""
    export = save_backbone(model, config, directory, half=half)
    (export / "MODEL_CARD.md").write_text(model_card(json.loads((export / "config.json").read_text())))
    return export


def square_input_size(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """The side in pixels of the images ``model`` (built with ``kwargs``) takes: its ``img_size``, else its timm
    default; a ``UsageError`` unless one number (the data pipeline feeds square images)."""
    input_size = kwargs.get("img_size", model.default_cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise UsageError(f"img_size={input_size!r}: the data pipeline feeds square images, so img_size is one "
                         f"number of pixels")
    return input_size


def check_args(args: argparse.Namespace, given: Collection[str]) -> None:
    """What the flags' types cannot check alone, before anything is built: a ``UsageError`` for settings that do
    not go together (backbone.py's and benchmarks/backbone_step.py's), and for a flag named on the command line
    (``given``, :func:`given_flags`) that the others leave without effect."""
    if args.randaug == 0 and "randaug_magnitude" in given:
        raise UsageError("--randaug-magnitude: --randaug 0 builds no RandAugment, so no magnitude is used: drop one "
                         "of them")
    if args.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.init_from is not None and (args.resume or args.pretrained):
        raise UsageError(f"--init-from starts a new run from exported weights: it cannot be combined with "
                         f"{'--resume' if args.resume else '--pretrained'}")
    if args.batch_size % 2 and (args.mixup > 0 or args.cutmix > 0):
        raise UsageError(f"--batch-size {args.batch_size}: timm's mixup and cutmix pair each image with another "
                         f"of its batch, so the batch must be even (or pass --mixup 0 --cutmix 0)")
    parse_kwargs(args.model_kwargs)


def main(argv: list[str] | None = None) -> int:
    args, given = None, frozenset()

    def run() -> int:
        nonlocal args, given
        parser = build_parser()
        args = parser.parse_args(argv)
        given = given_flags(parser, argv)
        check_args(args, given)
        train(args, given)
        return 0

    def interrupted_line() -> str:
        if args is None or not (Path(args.output_dir) / STATE_FILE).exists():
            return "interrupted before an epoch was saved: run the command again"
        return f"interrupted: go on with {go_on_command(args, given)}"

    return run_command(run, interrupted_line)


if __name__ == "__main__":
    sys.exit(main())
