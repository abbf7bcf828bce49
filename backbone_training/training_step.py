"""The training step and the epochs of them: :class:`TrainingStep` (augment a batch on the device, optimise on it,
set the learning rate), built once from the recipe's flags by :func:`build_training_step`; :func:`run_epoch` over
the batches :func:`epoch_batches` hands it; and :func:`accuracy`, what the epochs are scored by. Apart from
backbone.py so that benchmarks/backbone_step.py times the very step the command trains with, and so that what a
step on a GPU must not do (wait for the device, copy from the host) is said in one place."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from collections.abc import Iterator

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from cli import library_log_quieted, progress_bar
from envs.vit.augment import RandAugment, random_crop_flip
from envs.vit.backbone_checkpoint import normalize
from envs.vit.data import ImageSplit, StreamedImages, errors_of_workers
from envs.vit.device import autocast_to

STREAM_WORKERS = min(8, os.cpu_count() or 1)  # processes decoding a streamed training split ahead


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
    # timm logs a bare line that a one-step schedule (a smoke test) leaves the cosine idle; backbone.py warns of
    # short schedules itself (--warmup-epochs not fewer than --epochs)
    with library_log_quieted("timm.scheduler.cosine_lr"):
        scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=lr * 1e-2,
                                      warmup_t=int(args.warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 1e-3,
                                      t_in_epochs=False)
    mixup, criterion = make_mixup_and_loss(args, num_classes)
    return TrainingStep(model=torch.compile(model) if args.compile else model, optimizer=optimizer,
                        scheduler=scheduler, criterion=criterion, mixup=mixup,
                        randaugment=RandAugment(args.randaug, args.randaug_magnitude) if args.randaug > 0 else None,
                        generator=torch.Generator(device).manual_seed(args.seed), config=config,
                        amp=resolve_amp(args.amp, device))


def warn_if_warmup_fills(args: argparse.Namespace) -> None:
    """Warn where the schedule's length, ``args.epochs``, is no more than ``--warmup-epochs``: its learning rate
    would rise for the whole run and never peak nor decay. The length is ``--epochs`` or, with ``--time-budget``,
    the epochs that fit in it (:func:`~backbone_training.time_budget.fit_time_budget`), and the warning names
    the one that set it, with what to change."""
    if args.warmup_epochs < args.epochs:
        return
    if args.time_budget is None:
        schedule, longer = f"--epochs {args.epochs}", ""
    else:
        fit = "epoch that fits" if args.epochs == 1 else "epochs that fit"
        schedule = f"the {args.epochs} {fit} in --time-budget {args.time_budget:g} s"
        longer = ", or a longer --time-budget: 20m, 1.5h"
    warnings.warn(f"--warmup-epochs {args.warmup_epochs:g} is not fewer than {schedule}: the learning rate never "
                  f"leaves its warm-up (pass a shorter --warmup-epochs{longer})", stacklevel=2)


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """Whether a run trains in bf16 autocast: as ``--amp``/``--no-amp`` say, else on a GPU only. On a CPU
    without native bf16, autocast emulates it: the tiny and the reference ViT-Tiny trained 2.5 and 20 times
    slower than in float32 on a 2-core AVX2 CPU."""
    return device.type == "cuda" if amp is None else amp


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
    bar = progress_bar(epoch_batches(images, order, batch_size, steps, pin_memory=device.type == "cuda"),
                       total=steps, name=progress, unit="it", leave=False)
    on_terminal = not bar.disable
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


ACCURACY_BATCH = 512
"""Images per forward of :func:`accuracy` (a forward without gradients, on the validation or test split)."""


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: ImageSplit, config: dict, device: torch.device, amp: bool) -> float:
    """Top-1 accuracy on ``split``, counted on the device and read once."""
    model.eval()
    labels = split.labels.to(device)
    correct, start = torch.zeros((), dtype=torch.long, device=device), 0
    for images in split.batches(ACCURACY_BATCH):
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
