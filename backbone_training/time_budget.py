"""``--time-budget``: how many epochs fit in the seconds left (:func:`epochs_within`), two epochs' time (and the
compiling, under ``--compile``) kept for the test reading and the export, and the schedule set to them once an
epoch has been timed (:func:`fit_time_budget`). Apart from backbone.py: the arithmetic and when it is measured are
one idea, tested on their own."""

from __future__ import annotations

import argparse
import time

from backbone_training.training_step import TrainingStep, warn_if_warmup_fills

COMPILE_RESERVE_S = 60.0
"""What ``--time-budget`` keeps for compiling the model for the test reading under ``--compile``."""


def epochs_within(seconds_left: float, epoch_seconds: float, epochs_done: int, compiled: bool) -> int:
    """The schedule length that ends within ``seconds_left`` more seconds of epochs of ``epoch_seconds``, after
    ``epochs_done`` (at least the epochs done), with two epochs' time kept for the test reading and the export,
    and :data:`COMPILE_RESERVE_S` more when the model is ``compiled`` for them."""
    reserve = 2 * epoch_seconds + (COMPILE_RESERVE_S if compiled else 0.0)
    return epochs_done + max(0, int((seconds_left - reserve) // epoch_seconds))


def fit_time_budget(args: argparse.Namespace, step: TrainingStep, history: list[dict], epoch: int, start_epoch: int,
                    started: float, steps_per_epoch: int) -> None:
    """Set the schedule's length (``args.epochs`` and the cosine schedule) to the epochs that fit in
    ``--time-budget`` seconds from ``started`` (:func:`epochs_within`), after ``epoch`` (counted from 0) ends. It is
    measured on the second epoch this process runs, after ``start_epoch`` (the first pays for compiling), or on
    the first where no second is scheduled (then again on the second, if the first plans one). A change is
    printed and recorded in ``args.schedule_changes`` for the card; a length that the warm-up fills is warned of,
    changed or not (:func:`~backbone_training.training_step.warn_if_warmup_fills`)."""
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
    warn_if_warmup_fills(args)
