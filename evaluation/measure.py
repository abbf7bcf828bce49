"""Every row of a run measured on the evaluated images (:func:`evaluate_methods`): the results table, each row's
answer on each image and the timing rounds (:class:`Evaluation`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from envs.vit.data import ImageSplit
from envs.vit.device import autocast_to
from envs.vit.staged_vit import StagedViT
from evaluation.compare import versus_best_heuristics
from evaluation.methods import Method, calibrate_cascades, match_tome_cost
from evaluation.predictions import cost, per_image_predictions, predict, quality
from evaluation.results_table import BASELINE, SPEED_BATCH_SIZES, column_docs
from evaluation.speed import speed_columns
from policies.cascade import CascadeViT
from policies.pruned_vit import PrunedViT


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_methods` measured."""

    methods: list[Method]
    """The rows as they were evaluated, in table order: ToMe at the cost it matched, each cascade calibrated."""
    table: pd.DataFrame
    """One row per method, the columns of ``evaluation.results_table.COLUMNS``."""
    predictions: pd.DataFrame
    """Each image's label and every row's predicted class (:func:`per_image_predictions`)."""
    speed_rounds: dict[str, list[list[float]]] | None
    """Per images/s column, each row's images/s in each timing round (None without timings)."""


def evaluate_methods(staged: StagedViT, backbone_config: Mapping[str, Any], split: ImageSplit,
                     methods: Sequence[Method], reduction: str, *, batch_size: int = 256, seed: int = 0,
                     speed_repeats: int | None = 5, speed_batch_sizes: Sequence[int] = SPEED_BATCH_SIZES,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
                     calibration: ImageSplit | None = None, selection: ImageSplit | None = None,
                     compile_speed: bool = False) -> Evaluation:
    """The results table, one row per method with the columns of ``evaluation.results_table.COLUMNS``, with every
    row's answer on every image and the images/s of every timing round.

    Every row runs on ``device``: ``staged`` and the methods' policy modules are moved there (in place), and
    each batch of images. Its forwards (calibration, accuracy, timing) run in ``dtype``: under
    ``torch.autocast`` to it unless it is float32. ``speed_repeats=None`` skips the timings (their columns stay
    empty); otherwise the rows are timed in turns (``evaluation.speed.timed_in_turns``) over ``speed_repeats``
    rounds at each of ``speed_batch_sizes`` (their columns, the median images/s, in ascending order;
    ``evaluation.speed.speed_images`` says on which images), and ``speedup`` is the median within a round of the
    ratio to the unpruned model at the largest; ``compile_speed`` times compiled forwards
    (``evaluation.speed.compile_models``). ``calibration``: the images that cascade rows are calibrated on
    (:func:`calibrate_cascades`), held out from ``split``. ``selection``: the images the heuristic that learned rows
    are compared with is chosen on (``evaluation.compare.best_heuristics``), held out from ``split``; None:
    ``split`` itself. ``progress``: progress bars on stderr where it is a terminal (``cli.progress_bar``).
    """
    device, speed_batch_sizes = torch.device(device), sorted(set(speed_batch_sizes))
    staged = staged.eval().to(device)
    for method in methods:
        for module in method.modules.values():
            module.to(device)
    with autocast_to(device, dtype):
        methods = match_tome_cost(methods, staged, backbone_config, reduction)
        methods = calibrate_cascades(methods, staged, backbone_config, reduction, calibration, batch_size, progress)
        baseline = next((method for method in methods if method.selection == "baseline"),
                        Method(BASELINE, "baseline"))
        baseline_first = [baseline, *(method for method in methods if method is not baseline)]

        def build(method: Method) -> PrunedViT | CascadeViT:
            return method.model(staged, backbone_config, reduction, seed)

        models = {method: build(method) for method in baseline_first}
        outputs = predict(models, split, batch_size, f"evaluating {len(models)} methods" if progress else None)
        reference = outputs[baseline][0]
        comparisons = versus_best_heuristics(methods, outputs, split.labels, build, selection, batch_size, progress)
        rows = [{"method": method.name, "budget": method.budget,
                 **quality(outputs[method][0], split.labels, reference), **cost(models[method], outputs[method][1]),
                 **comparisons.get(method, {})} for method in methods]
        table = pd.DataFrame(rows).reindex(columns=list(column_docs(len(staged.prune_points), speed_batch_sizes)))
        table["budget"] = table["budget"].astype(float)
        speed_rounds = None
        if speed_repeats is not None:
            speeds, speed_rounds = speed_columns(models, methods, baseline, split, backbone_config, speed_batch_sizes,
                                                 speed_repeats, device, compile_speed, progress)
            for column, values in speeds.items():
                table[column] = values
    return Evaluation(methods, table, per_image_predictions(methods, outputs, split), speed_rounds)
