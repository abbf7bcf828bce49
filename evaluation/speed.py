"""The speed columns of evaluate.py's table (:func:`speed_columns`): every row timed in turns, compiled or not
(:func:`timed_in_turns`), on which images (:func:`speed_images`, :func:`speed_note`), and the warning when the
timing rounds disagree (:func:`warn_of_a_busy_machine`)."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from cli import progress_bar
from envs.vit.backbone_checkpoint import normalize
from envs.vit.data import ImageSplit
from envs.vit.timing import Key, images_per_second_in_turns, ratios_within_rounds, round_spread
from evaluation.methods import Method
from evaluation.results_table import SPEED_MIN_IMAGES, speed_column
from policies.cascade import CascadeViT
from policies.pruned_vit import PrunedViT

SPEED_SPREAD_WARNING = 1.5
"""A row's fastest timing round over its slowest above which evaluate.py warns of a busy machine."""


def speed_columns(models: Mapping[Method, PrunedViT | CascadeViT], methods: Sequence[Method], baseline: Method,
                  split: ImageSplit, backbone_config: Mapping[str, Any], batch_sizes: Sequence[int], repeats: int,
                  device: torch.device, compile_speed: bool,
                  progress: bool) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """The speed columns, each row's value in ``methods``' order: the median images/s at each of ``batch_sizes``
    (ascending) and ``speedup``, the median within a round of the ratio to ``baseline``'s at the largest; and per
    images/s column, each row's images/s in each round (``evaluation.measure.Evaluation.speed_rounds``). The
    ``models`` are timed in turns (:func:`timed_in_turns`) on :func:`speed_images`, compiled where
    ``compile_speed``; a row whose rounds differ widely is warned of (:func:`warn_of_a_busy_machine`)."""
    images = speed_images(split, backbone_config, max(map(timed_images, batch_sizes)), device)
    rates = timed_in_turns(models, {size: images[:timed_images(size)] for size in batch_sizes}, repeats,
                           compile_on=device if compile_speed else None, progress=progress)
    speedups = ratios_within_rounds(rates[max(batch_sizes)], baseline)
    columns = {**{speed_column(size): [statistics.median(rates[size][method]) for method in methods]
                  for size in batch_sizes},
               "speedup": [statistics.median(speedups[method]) for method in methods]}
    warn_of_a_busy_machine(rates, methods, repeats)
    rounds = {speed_column(size): [[round(rate, 1) for rate in rates[size][method]] for method in methods]
              for size in batch_sizes}
    return columns, rounds


def timed_in_turns(models: Mapping[Key, PrunedViT | CascadeViT], images: Mapping[int, torch.Tensor], rounds: int, *,
                   compile_on: torch.device | None = None, progress: bool = False) -> dict[int, dict[Key, list[float]]]:
    """Per batch size (``images``' keys), each model's images/s in each of ``rounds`` rounds over that size's
    images, the models timed in turns within each round (``envs.vit.timing.images_per_second_in_turns``: a
    ratio taken within a round cancels the machine's drift), after one warm-up round. With ``compile_on`` (the
    models' device) the models are compiled first (:func:`compile_models`) and warmed up for two rounds: the
    first call compiles, and on a GPU the second records the CUDA graph.

    Compiled models run together: every model's compiled forward is one function to the compiler
    (``Module._call_impl``), whose graphs it tells apart by guards. It keeps ``recompile_limit`` graphs per
    function (8 by default) and would run the calls beyond them eagerly: the limit is raised to that many per
    model, and reaching it is an error rather than a column timed eagerly under a compiled heading. And it would
    trace a float the forward reads (the budget) as a variable once two models differ in it, making guards that
    torch 2.14 fails on: floats are specialised, so each model's graph has its own budget, as a model compiled
    alone does.
    """
    if compile_on is not None:
        compile_models(models.values(), compile_on)
    runs = {key: model.forward_with_kept for key, model in models.items()}
    warmup_rounds = 1 if compile_on is None else 2
    per_model = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=per_model * len(models), fail_on_recompile_limit_hit=True,
                                    specialize_float=True), \
            progress_bar(total=len(images) * (warmup_rounds + rounds) * len(models),
                         name="timing" if progress else None, unit="pass") as bar:
        return {size: images_per_second_in_turns(runs, size_images, size, rounds, warmup_rounds, bar.update)
                for size, size_images in images.items()}


def compile_models(models: Iterable[PrunedViT | CascadeViT], device: torch.device) -> None:
    """Compile the forwards of ``models`` with ``torch.compile``, one graph for every batch size (a cascade's
    second forward runs as many images as are unsure), replayed as CUDA graphs on a GPU
    (``mode="reduce-overhead"``: one launch per forward and batch size). The compiler's caches are emptied
    first, so that graphs of models no longer used do not count against :func:`timed_in_turns`' limit."""
    torch.compiler.reset()
    for model in models:
        model.compile(dynamic=True, mode="reduce-overhead" if device.type == "cuda" else None)


def timed_images(batch_size: int) -> int:
    """The images of one timed pass at ``batch_size``: whole batches, at least ``SPEED_MIN_IMAGES``."""
    return batch_size * math.ceil(SPEED_MIN_IMAGES / batch_size)


def speed_images(split: ImageSplit, backbone_config: Mapping[str, Any], count: int,
                 device: torch.device) -> torch.Tensor:
    """``count`` normalised images on ``device``: the split's first, repeated when it has fewer, so that a batch
    is timed at the size asked, not at the split's (:func:`speed_note` says so in the results)."""
    distinct = min(len(split), count)
    images = normalize(split.images[:distinct].to(device), backbone_config)
    return images.repeat(math.ceil(count / distinct), 1, 1, 1)[:count]


def speed_note(split_images: int, batch_sizes: Sequence[int]) -> str:
    """Which images :func:`speed_images` times for a split of ``split_images``, for the results' settings: how
    many distinct ones, and the batch sizes whose passes repeat them."""
    needed = {size: timed_images(size) for size in batch_sizes}
    repeated = [str(size) for size, count in needed.items() if count > split_images]
    note = f"the split's first {min(split_images, max(needed.values()))} images"
    return note + (f", repeated to fill the passes at batch sizes {', '.join(repeated)}" if repeated else "")


def warn_of_a_busy_machine(rates: Mapping[int, Mapping[Method, Sequence[float]]], methods: Sequence[Method],
                           rounds: int) -> None:
    """One line on stderr where a row's images/s varied more than :data:`SPEED_SPREAD_WARNING` times between the
    timing rounds (``rates``: per batch size, each method's rate in each round): other work shared the machine,
    and the speed columns, medians of the rounds, may not describe it."""
    spread, method, size = max(((round_spread(rates[size][method]), method, size) for size in rates
                                for method in methods), key=lambda row: row[0])
    if spread > SPEED_SPREAD_WARNING:
        row = method.name if method.budget is None else f"{method.name} at {method.budget:g}"
        print(f"warning: {row}'s images/s at batch {size} varied {spread:.1f}x between the {rounds} timing rounds "
              f"(settings.speed_rounds): the machine was busy with other work, and the speed columns may not "
              f"describe it: time again on a quiet machine", file=sys.stderr)
