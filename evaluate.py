"""Evaluate trained token-pruning policies against baselines; print and save the results table.

    python evaluate.py --data-dir ../shared/data                   # the committed policy, test split
    python evaluate.py --checkpoint runs/marl/target_ratio=0.5/checkpoint_000005 --split val --limit 2000 --no-speed
    python evaluate.py --heuristics-only --backbone runs/backbone/backbone --data-dir ../shared/data  # no policy
    python evaluate.py --data-dir ../shared/data --device cuda --dtype bfloat16 --speed-batch-sizes 1,256,1024

No Ray cluster: only the policy modules are loaded from the checkpoint (from its export, safetensors and
JSON, when it has one: ``policies.export``), and each row's pruned ViT (``policies.pruned_vit.PrunedViT``)
runs here, in batches. One row per method and budget (``budget`` = ``target_ratio``, see docs/DESIGN.md):

- ``Baseline (unpruned)``: the timm model's own forward.
- ``Random``, ``Greedy attention`` (top-k class attention, EViT), ``Greedy similarity``, ``Attention NMS``,
  ``Distinctive NMS`` (``policies.heuristics``): exact budget, at every budget of ``--budgets`` and of the
  checkpoints.
- ``ToMe`` (``envs.vit.tome``): merging in every block, at the GFLOPs of the dearest other row at its budget
  (the agents' where a policy is evaluated; ``match_tome_cost``).
- ``MARL exact``: both agents, each choosing its most likely set in turn: the attention agent the tokens it
  keeps, the similarity agent those it removes among the others (``policies.decisions.policy_selector``).
- ``MARL attention only`` / ``MARL similarity only``: one module of the pair alone, exact budget. A
  checkpoint trained with one agent gives only its row.
- ``Cascade (greedy similarity)``, with ``--cascade FIRST,SECOND``: a budget per image
  (``policies.cascade``). Greedy similarity removes FIRST at ``--cascade-points`` on every image, and the
  least sure images run again removing SECOND, as many as keep the mean GFLOPs at greedy similarity's at the
  checkpoint's budget. That share is calibrated on the validation split (or ``--calibration-images`` of it),
  so the row is measured on another split; its GFLOPs are the mean measured there. It counts as a heuristic
  in the learned rows' ``delta_best_heuristic``.
- ``MARL cascade``: the same with both agents choosing the tokens of both forwards, when ``--cascade-points``
  are the checkpoint's pruning points (the agents were trained on those).
MARL rows come at the checkpoint's own ``target_ratio``, at the budgets of ``--budgets`` it was trained at
(``train.py --train-ratios``) and at those of ``--checkpoints-per-budget``.
Every pruned row removes tokens the same way: the checkpoint's ``reduction`` unless ``--reduction`` says
otherwise (``envs.vit.token_merge``). GFLOPs come from ``PrunedViT.gflops`` (``envs.vit.flops``) per image; the
columns are defined in ``envs.results_table.COLUMNS`` (also written to results.md and results.json); every
row's answer on every image goes to predictions.csv.gz (``per_image_predictions``). Learned and
cascade rows are compared with the heuristic most accurate at their budget on ``--selection-images`` validation
images (with ``--split val``, on the evaluated images).
Every row runs on ``--device`` (a GPU when one is visible, by default): the backbone, the policy modules, the
images, the heuristics, merging, ToMe and the cascade; in float32 or, with ``--dtype bfloat16``, every forward
under ``torch.autocast`` to bfloat16 (the token counts stay exact; ties in the scores may break otherwise).
The rows are timed in turns at each of ``--speed-batch-sizes`` with the project's one timer, synchronised with
the device (``envs.vit.timing``); results.json records the device, the dtype and which images were timed. With
``--compile`` the timed forwards are compiled (``torch.compile``, one graph per row; on a GPU
``mode="reduce-overhead"``, which replays CUDA graphs, the way to batch-1 latency there); the other columns
come from the eager forwards either way.
Numbers other than timings are deterministic for the same inputs, ``--seed``, ``--batch-size``, ``--device``
and ``--dtype``.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch
from sklearn.metrics import f1_score
from tqdm import tqdm

from cli import (
    OneLineParser,
    add_data_access_arguments,
    check_output_dir,
    code_commit,
    data_access,
    given_flags,
    output_directory,
    positive_int,
    random_seed,
    run_command,
    versions_line,
)
from envs.errors import UsageError
from envs.problem import PruningProblem, block_indices, budget_key, flag_name, removal_ratio, removal_ratios
from envs.results_table import (
    BASELINE,
    RESULT_FILES,
    SPEED_BATCH_SIZES,
    SPEED_MIN_IMAGES,
    column_docs,
    header_line,
    markdown_table,
    prediction_column,
    speed_column,
    write_results,
)
from envs.vit.backbone_checkpoint import (
    NOT_A_CLONE,
    REFERENCE_BACKBONE,
    installed_without_repository,
    is_backbone_checkpoint,
    normalize,
    repository_relative,
)
from envs.vit.data import DATASETS, ClassesDiffer, DataError, ImageSplit, default_data_dir, limited_positions
from envs.vit.device import DEVICE_CHOICES, DTYPES, autocast_to, describe_device, resolve_device
from envs.vit.flops import ViTSpec, tome_gflops
from envs.vit.held_out import check_held_out, load_checked_split
from envs.vit.staged_vit import DEFAULT_PRUNE_POINTS, StagedViT
from envs.vit.timing import Key, images_per_second_in_turns, ratios_within_rounds, round_spread
from envs.vit.token_merge import REDUCTIONS
from envs.vit.tome import tome_schedule
from policies.cascade import CascadeViT
from policies.checkpoints import (
    CheckpointInfo,
    Modules,
    PolicyCheckpointError,
    holds_policies,
    load_policies,
)
from policies.decisions import DEFAULT_PROTECTED_SHARE
from policies.heuristics import HEURISTIC_RULES
from policies.pruned_vit import PrunedViT, checked_backbone, greedy_similarity_gflops
from policies.token_scorer import TokenScoring

REPO = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO / "reference" / "marl_policy"
HEURISTIC_ROWS = {**{name: rule.label for name, rule in HEURISTIC_RULES.items()}, "tome": "ToMe"}
MARL_EXACT = "MARL exact"
MARL_ONLY = {"attention": "MARL attention only", "similarity": "MARL similarity only"}
CASCADE = {"similarity": "Cascade (greedy similarity)", "policy": "MARL cascade"}
CASCADE_PRUNE_POINTS = (1, 3, 5, 7, 9, 11)
"""``--cascade-points`` unless given: six pruning points, where cascade_headroom's best pairs prune
(benchmarks/README.md)."""

BOOTSTRAP_RESAMPLES = 2000
SPEED_SPREAD_WARNING = 1.5
"""A row's fastest timing round over its slowest above which evaluate.py warns of a busy machine."""
CHOSEN_ON_VALIDATION = "the best heuristic of each budget is chosen on validation images"


class EvaluationError(UsageError):
    """A bad argument, checkpoint or combination of them; the message is meant for the user as is. A
    :class:`UsageError`, as every bad argument is."""


@dataclass(frozen=True)
class CascadePasses:
    """A cascade row's two forwards, removing ``ratios[0]`` (every image) then ``ratios[1]`` (the least sure)
    at ``prune_points``, and the doubt above which an image runs twice (``policies.cascade``), which
    :func:`calibrate_cascades` sets so that the mean GFLOPs per image are ``target_gflops``: the measured mean is
    checked against it (:func:`warn_of_dear_cascades`)."""

    prune_points: tuple[int, ...]
    ratios: tuple[float, float]
    threshold: float = 0.0
    target_gflops: float | None = None


@dataclass(frozen=True, eq=False)
class Method:
    """One row of the table: how tokens are chosen and at which budget.

    ``selection``: ``baseline``, a heuristic of ``policies.heuristics``, ``tome``, ``policy`` (``modules``
    choose the tokens, in turns that protect ``protected_share``, ``policies.decisions``) or ``cascade`` (its
    ``cascade`` passes, the tokens chosen by ``modules`` or, without them, greedy similarity).
    ``tome_gflops``: the cost ToMe matches (``PrunedViT``'s default when None: greedy similarity's at
    ``budget``).
    """

    name: str
    selection: str
    budget: float | None = None
    modules: Modules = field(default_factory=dict)
    protected_share: float = DEFAULT_PROTECTED_SHARE
    tome_gflops: float | None = None
    cascade: CascadePasses | None = None

    def model(self, staged: StagedViT, backbone_config: Mapping[str, Any], reduction: str,
              seed: int = 0) -> PrunedViT | CascadeViT:
        """The pruned ViT of this row; a new one per pass, so Random repeats its choices."""
        if self.cascade is not None:
            stages = StagedViT(staged.vit, self.cascade.prune_points).eval()
            first, second = (PrunedViT(stages, backbone_config, dict(self.modules) or "similarity", ratio, reduction,
                                       protected_share=self.protected_share) for ratio in self.cascade.ratios)
            return CascadeViT(first, second, self.cascade.threshold)
        vit_selection = {"baseline": None, "policy": self.modules}.get(self.selection, self.selection)
        return PrunedViT(staged, backbone_config, vit_selection, self.budget, reduction, seed=seed,
                         protected_share=self.protected_share, tome_gflops=self.tome_gflops)


def plan_methods(budgets: Sequence[float], policies: Mapping[float, tuple[Modules, PruningProblem]],
                 cascade: tuple[float, CascadePasses] | None = None) -> list[Method]:
    """Rows in table order: the baseline, then per budget the heuristics, the cascade and the MARL rows there.

    ``policies`` maps a budget to the modules and the problem of the checkpoint evaluated at it; ``cascade``
    is the budget and the passes of the cascade rows (greedy similarity's, and the agents' where they were
    trained on the cascade's pruning points).
    """
    methods = [Method(BASELINE, "baseline")]
    cascade_budget, passes = cascade or (None, None)
    for budget in sorted(set(budgets) | set(policies) | ({cascade_budget} if cascade else set())):
        methods += [Method(name, selection, budget) for selection, name in HEURISTIC_ROWS.items()]
        if budget == cascade_budget:
            methods.append(Method(CASCADE["similarity"], "cascade", budget, cascade=passes))
        if budget not in policies:
            continue
        modules, problem = policies[budget]
        if problem.agents == "both":
            methods.append(Method(MARL_EXACT, "policy", budget, modules, problem.protected_share))
            if budget == cascade_budget and passes.prune_points == problem.prune_points:
                methods.append(Method(CASCADE["policy"], "cascade", budget, modules, problem.protected_share,
                                      cascade=passes))
        methods += [Method(MARL_ONLY[name], "policy", budget, {name: modules[name]}) for name in modules]
    return methods


def match_tome_cost(methods: Sequence[Method], staged: StagedViT, backbone_config: Mapping[str, Any],
                    reduction: str) -> list[Method]:
    """``methods`` with each ToMe row set to the cost of the dearest other row at its budget (the agents', whose
    networks add to their features, where a policy is evaluated), so ToMe is compared at the cost of the rows
    it is compared with, as closely as whole merges per block allow."""
    costs = [(method.budget, method.model(staged, backbone_config, reduction).gflops().total) for method in methods
             if method.selection not in ("tome", "baseline", "cascade")]
    matched = {budget: max(gflops for at, gflops in costs if at == budget) for budget, _ in costs}
    spec = ViTSpec.from_model(staged.vit)
    for budget, gflops in sorted(matched.items()):
        if (any(method.selection == "tome" and method.budget == budget for method in methods)
                and not any(tome_schedule(spec, gflops))):
            unpruned = tome_gflops(spec, [0] * spec.depth).total
            warnings.warn(f"ToMe at {budget:g} is the unpruned model: the rows it is matched to cost {gflops:.4g} "
                          f"GFLOPs, about the unpruned model's {unpruned:.4g} or more (the agents' networks outweigh "
                          f"this ViT), so it merges no token", stacklevel=2)
    return [replace(method, tome_gflops=matched[method.budget]) if method.selection == "tome" else method
            for method in methods]


def calibrate_cascades(methods: Sequence[Method], staged: StagedViT, backbone_config: Mapping[str, Any],
                       reduction: str, calibration: ImageSplit | None, batch_size: int) -> list[Method]:
    """``methods`` with each cascade row's threshold calibrated on the ``calibration`` images (held out from
    those evaluated) so that its mean GFLOPs per image are greedy similarity's at its budget."""
    calibrated = []
    for method in methods:
        if method.selection == "cascade":
            if calibration is None:
                raise EvaluationError("a cascade row needs calibration images")
            model = method.model(staged, backbone_config, reduction)
            target = greedy_similarity_gflops(staged, method.budget, reduction)
            batches = (model.normalize(images.to(model.device)) for images in calibration.batches(batch_size))
            try:
                threshold = model.calibrate(batches, target)
            except UsageError as error:  # the first forward alone costs the budget
                raise EvaluationError(f"cascade {method.cascade.ratios}: {error}") from None
            method = replace(method, cascade=replace(method.cascade, threshold=threshold, target_gflops=target))
        calibrated.append(method)
    return calibrated


CASCADE_COST_TOLERANCE = 0.05
"""How far above its budget a cascade row's measured mean GFLOPs may be before a warning says so."""


def warn_of_dear_cascades(table: pd.DataFrame, methods: Sequence[Method]) -> None:
    """A warning for each cascade row of ``table`` (one row per method of ``methods``, as
    :func:`evaluate_methods` returns them) whose measured GFLOPs are more than :data:`CASCADE_COST_TOLERANCE`
    above those it was calibrated to (``CascadePasses.target_gflops``): more of the evaluated images than of the
    calibration images ran twice (few of either), and it is compared with rows cheaper than itself."""
    for row, method in zip(table.itertuples(), methods, strict=True):
        if method.cascade is None:
            continue
        target = method.cascade.target_gflops
        if row.gflops > (1 + CASCADE_COST_TOLERANCE) * target:
            warnings.warn(f"{row.method} at {row.budget:g} cost {row.gflops:.4f} GFLOPs, "
                          f"{100 * (row.gflops / target - 1):.0f}% above the {target:.4f} it was calibrated to: "
                          f"more images ran twice than in calibration (more --calibration-images or more evaluated "
                          f"images narrow the gap)", stacklevel=2)


def predict(models: Mapping[Method, PrunedViT | CascadeViT], split: ImageSplit, batch_size: int,
            bar: tqdm | None = None) -> dict[Method, tuple[torch.Tensor, torch.Tensor]]:
    """Each model's predicted classes ``[n]`` and kept tokens ``[n, num_stages]`` over the whole split, on the
    CPU. Every batch of images is read once for all models, so a streamed split is decoded once, and moved to
    the models' device once; the predictions stay there until the end (no wait for the device per batch)."""
    predictions: dict[Method, list] = {method: [] for method in models}
    kept: dict[Method, list] = {method: [] for method in models}
    first = next(iter(models.values()))  # one backbone: one device, one normalisation
    for images in split.batches(batch_size):
        inputs = first.normalize(images.to(first.device))
        for method, model in models.items():
            logits, batch_kept = model.forward_with_kept(inputs)
            predictions[method].append(logits.argmax(dim=1))
            kept[method].append(batch_kept)  # on the CPU already (PrunedViT.forward_with_kept)
        if bar is not None:
            bar.update()
    return {method: (torch.cat(predictions[method]).cpu(), torch.cat(kept[method])) for method in models}


def quality(predictions: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro F1 and agreement with the unpruned predictions, in percent."""
    y_true, y_pred = labels.numpy(), predictions.numpy()
    return {"accuracy": 100.0 * float((y_pred == y_true).mean()),
            "f1_macro": 100.0 * float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro",
                                               zero_division=0)),
            "agreement": 100.0 * float((predictions == reference).double().mean())}


def cost(model: PrunedViT | CascadeViT, kept: torch.Tensor) -> dict[str, float]:
    """Mean per-image GMACs over each image's own token schedule and, but for a cascade (whose pruning points
    are its own), the mean fraction kept per stage."""
    parts = model.mean_gflops(kept)
    gflops = {"gflops": parts.total, "gflops_backbone": parts.backbone, "gflops_features": parts.features,
              "gflops_policies": parts.policies}
    if isinstance(model, CascadeViT):
        return gflops
    ratios = (kept[:, 1:].double() / model.staged.num_patches).mean(dim=0).tolist()
    return {**gflops, **{f"keep_ratio_s{i}": r for i, r in enumerate(ratios, start=1)}, "keep_ratio": ratios[-1]}


def best_heuristics(outputs: Mapping[Method, tuple], labels: torch.Tensor) -> dict[float, list[Method]]:
    """Per budget, the heuristic rows of ``outputs`` (:func:`predict`'s; greedy similarity's cascade included),
    most accurate on ``labels`` first, equals in table order: the first is what learned rows are compared with
    (the next, for the heuristic cascade row when it is the first). Chosen on images other than those the
    comparison is made on, the reference is not the one whose noise happened to favour it there (the best of
    several rows on the same images reads above its true accuracy)."""
    heuristics = [method for method in outputs if is_heuristic(method)]
    accuracy = {method: (outputs[method][0] == labels).double().mean().item() for method in heuristics}
    ranking: dict[float, list[Method]] = {}
    for method in sorted(heuristics, key=lambda m: -accuracy[m]):  # stable: equals stay in table order
        ranking.setdefault(method.budget, []).append(method)
    return ranking


def versus_heuristics(method: Method, best: Method, methods: Sequence[Method], outputs: Mapping[Method, tuple],
                      labels: torch.Tensor) -> dict[str, float | str]:
    """Accuracy of ``method`` minus the ``best`` heuristic's at its budget (:func:`best_heuristics`) and minus
    ToMe's, each with a paired bootstrap 95% interval (the same images resampled for both), in points."""
    tome = next(m for m in methods if m.selection == "tome" and m.budget == method.budget)
    correct = {m: (outputs[m][0] == labels).numpy().astype(float) for m in (method, best, tome)}
    difference, low, high = paired_difference(correct[method], correct[best])
    to_tome, tome_low, tome_high = paired_difference(correct[method], correct[tome])
    return {"best_heuristic": best.name, "delta_best_heuristic": difference, "delta_ci_low": low,
            "delta_ci_high": high, "delta_tome": to_tome, "delta_tome_ci_low": tome_low,
            "delta_tome_ci_high": tome_high}


def is_heuristic(method: Method) -> bool:
    """Whether a row's tokens are chosen by a rule, not by trained agents (the baseline is not pruned)."""
    return method.selection in HEURISTIC_ROWS or (method.selection == "cascade" and not method.modules)


def paired_difference(correct: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """The accuracy of ``correct [n]`` (0/1 per image) minus that of ``reference [n]`` on the same images, and
    the paired bootstrap 95% interval of the difference (the images resampled for both), in points."""
    result = scipy.stats.bootstrap((correct, reference), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                                   paired=True, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
                                   method="percentile", rng=np.random.default_rng(0))
    low, high = result.confidence_interval
    return float(100 * (correct.mean() - reference.mean())), float(100 * low), float(100 * high)


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_methods` measured."""

    methods: list[Method]
    """The rows as they were evaluated, in table order: ToMe at the cost it matched, each cascade calibrated."""
    table: pd.DataFrame
    """One row per method, the columns of ``envs.results_table.COLUMNS``."""
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
    """The results table, one row per method with the columns of ``envs.results_table.COLUMNS``, with every
    row's answer on every image and the images/s of every timing round.

    Every row runs on ``device``: ``staged`` and the methods' policy modules are moved there (in place), and
    each batch of images. Its forwards (calibration, accuracy, timing) run in ``dtype``: under
    ``torch.autocast`` to it unless it is float32. ``speed_repeats=None`` skips the timings (their columns stay
    empty); otherwise the rows are timed in turns (:func:`timed_in_turns`) over ``speed_repeats`` rounds at
    each of ``speed_batch_sizes`` (their columns, the median images/s, in ascending order; :func:`speed_images`
    says on which images), and ``speedup`` is the median within a round of the ratio to the unpruned model at
    the largest; ``compile_speed`` times compiled forwards (:func:`compile_models`). ``calibration``: the images
    that cascade rows are calibrated on (:func:`calibrate_cascades`), held out from ``split``. ``selection``:
    the images the heuristic that learned rows are compared with is chosen on (:func:`best_heuristics`), held
    out from ``split``; None: ``split`` itself.
    """
    device, speed_batch_sizes = torch.device(device), sorted(set(speed_batch_sizes))
    staged = staged.eval().to(device)
    for method in methods:
        for module in method.modules.values():
            module.to(device)
    with autocast_to(device, dtype):
        methods = match_tome_cost(methods, staged, backbone_config, reduction)
        methods = calibrate_cascades(methods, staged, backbone_config, reduction, calibration, batch_size)
        baseline = next((method for method in methods if method.selection == "baseline"),
                        Method(BASELINE, "baseline"))
        baseline_first = [baseline, *(method for method in methods if method is not baseline)]

        def build(method: Method) -> PrunedViT | CascadeViT:
            return method.model(staged, backbone_config, reduction, seed)

        models = {method: build(method) for method in baseline_first}
        with tqdm(total=math.ceil(len(split) / batch_size), desc=f"evaluating {len(models)} methods", unit="batch",
                  disable=not progress) as bar:
            outputs = predict(models, split, batch_size, bar)
        reference = outputs[baseline][0]
        comparisons = versus_best_heuristics(methods, outputs, split.labels, build, selection, batch_size)
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


def versus_best_heuristics(methods: Sequence[Method], outputs: Mapping[Method, tuple], labels: torch.Tensor,
                           build: Callable[[Method], PrunedViT | CascadeViT], selection: ImageSplit | None,
                           batch_size: int) -> dict[Method, dict[str, float | str]]:
    """For each learned and cascade row of ``methods``, its columns against the most accurate other heuristic at
    its budget and against ToMe (:func:`versus_heuristics`, on the evaluated images' ``outputs`` and ``labels``).
    The heuristic is chosen (:func:`best_heuristics`) on the ``selection`` images, by heuristic models made afresh
    by ``build``, so that the Random row draws there as it draws in the table; without them, on the evaluated
    images."""
    compared = [method for method in methods if method.selection in ("policy", "cascade")]
    if not compared:
        return {}
    if selection is None:
        ranking = best_heuristics(outputs, labels)
    else:
        heuristics = {method: build(method) for method in methods if is_heuristic(method)}
        ranking = best_heuristics(predict(heuristics, selection, batch_size), selection.labels)
    return {method: versus_heuristics(method, next(m for m in ranking[method.budget] if m is not method), methods,
                                      outputs, labels) for method in compared}


def speed_columns(models: Mapping[Method, PrunedViT | CascadeViT], methods: Sequence[Method], baseline: Method,
                  split: ImageSplit, backbone_config: Mapping[str, Any], batch_sizes: Sequence[int], repeats: int,
                  device: torch.device, compile_speed: bool,
                  progress: bool) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """The speed columns, each row's value in ``methods``' order: the median images/s at each of ``batch_sizes``
    (ascending) and ``speedup``, the median within a round of the ratio to ``baseline``'s at the largest; and per
    images/s column, each row's images/s in each round (``Evaluation.speed_rounds``). The ``models`` are timed in
    turns (:func:`timed_in_turns`) on :func:`speed_images`, compiled where ``compile_speed``; a row whose rounds
    differ widely is warned of (:func:`warn_of_a_busy_machine`)."""
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


def per_image_predictions(methods: Sequence[Method], outputs: Mapping[Method, tuple],
                          split: ImageSplit) -> pd.DataFrame:
    """Each image's label and every row's predicted class, ``[n, 1 + len(methods)]``, in the split's order,
    indexed by ``image``, the image's index in its data set's file (``ImageSplit.file_indices``; its position in
    the split where it has none): what the rows' accuracy, F1, agreement and paired intervals are computed from,
    so that they can be checked, or rows of runs on other subsets of one split compared on the images they
    share, without running the models again."""
    columns = {prediction_column(method.name, method.budget): outputs[method][0].numpy() for method in methods}
    index = pd.Index(np.arange(len(split)) if split.file_indices is None else split.file_indices, name="image")
    return pd.DataFrame({"label": split.labels.numpy(), **columns}, index=index)


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


def compile_models(models: Iterable[PrunedViT | CascadeViT], device: torch.device) -> None:
    """Compile the forwards of ``models`` with ``torch.compile``, one graph for every batch size (a cascade's
    second forward runs as many images as are unsure), replayed as CUDA graphs on a GPU
    (``mode="reduce-overhead"``: one launch per forward and batch size). The compiler's caches are emptied
    first, so that graphs of models no longer used do not count against :func:`timed_in_turns`' limit."""
    torch.compiler.reset()
    for model in models:
        model.compile(dynamic=True, mode="reduce-overhead" if device.type == "cuda" else None)


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
            tqdm(total=len(images) * (warmup_rounds + rounds) * len(models), desc="timing", unit="pass",
                 disable=not progress) as bar:
        return {size: images_per_second_in_turns(runs, size_images, size, rounds, warmup_rounds, bar.update)
                for size, size_images in images.items()}


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


def ranked_images_evaluated(checkpoints: Mapping[Path, PruningProblem], val_size: int, seed: int,
                            limit: int | None) -> dict[str, int]:
    """For each checkpoint evaluated on validation images (``limit`` of the ``val_size``, load_split's subset), how
    many of them train.py ranked that run's checkpoints on (its ``val_limit`` subset): the best checkpoint reads
    high on the very images that chose it."""
    evaluated = limited_positions(val_size, limit or val_size, seed)
    return {repository_relative(path): len(np.intersect1d(evaluated,
                                                          limited_positions(val_size, problem.val_limit, seed)))
            for path, problem in checkpoints.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="policy checkpoint directory written by train.py (default: reference/marl_policy)")
    parser.add_argument("--backbone", default=None, help="backbone checkpoint directory (default: the policy "
                        f"checkpoint's, else {REFERENCE_BACKBONE.relative_to(REPO)})")
    parser.add_argument("--heuristics-only", action="store_true",
                        help="no policy: the heuristics, ToMe and --cascade on --backbone, e.g. to see what the agents "
                             "will have to beat before training them")
    parser.add_argument("--prune-points", type=block_indices, default=None,
                        help=f"with --heuristics-only, the blocks before which tokens are pruned (default: "
                             f"{','.join(map(str, DEFAULT_PRUNE_POINTS))}; a checkpoint brings its own)")
    parser.add_argument("--data-dir", default=default_data_dir(), help="default: %(default)s")
    parser.add_argument("--dataset", default=None, choices=DATASETS,
                        help="default: the data set of the checkpoint (or --backbone)")
    add_data_access_arguments(parser)
    parser.add_argument("--split", default="test", choices=("val", "test"),
                        help="test for final numbers, val (the backbone's held-out subset) for development "
                             "(default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate a seeded subset of N images")
    parser.add_argument("--budgets", type=_budgets, default="0.3,0.5,0.7",
                        help="target ratios of the heuristic rows, comma-separated; the checkpoints' own ratios "
                             "(--checkpoint's, --checkpoints-per-budget's, and a --train-ratios checkpoint's among "
                             "these) get MARL rows and the heuristic rows beside them (default: %(default)s)")
    parser.add_argument("--reduction", default=None, choices=REDUCTIONS,
                        help="what pruned rows do with removed tokens (default: the checkpoint's)")
    parser.add_argument("--checkpoints-per-budget", type=_checkpoints_per_budget, default={},
                        metavar="RATIO=PATH,...", help="more policy checkpoints, each evaluated at its budget")
    parser.add_argument("--cascade", type=_cascade_ratios, default=None, metavar="FIRST,SECOND",
                        help="add a cascade row at the checkpoint's budget (with --heuristics-only, the middle one of "
                             "--budgets): greedy similarity removing FIRST, then SECOND on the least sure images "
                             "(e.g. 0.35,0.1)")
    parser.add_argument("--cascade-points", type=block_indices, default=None,
                        help="with --cascade: its pruning points (default: "
                             f"{','.join(map(str, CASCADE_PRUNE_POINTS))})")
    parser.add_argument("--calibration-images", type=positive_int, default=None,
                        help="with --cascade: validation images it is calibrated on (default: all of them)")
    parser.add_argument("--selection-images", type=positive_int, default=2000,
                        help="validation images the heuristic that learned rows are compared with is chosen on, "
                             "per budget, so that it is not chosen on the test images (with --split val: the "
                             "evaluated images; default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="default: %(default)s")
    parser.add_argument("--device", default="auto",
                        help=f"where every row runs: {DEVICE_CHOICES} (default: %(default)s, a GPU when one is "
                             "visible)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="bfloat16 runs every forward under torch.autocast to it (default: %(default)s)")
    parser.add_argument("--speed-batch-sizes", type=_batch_sizes, default=SPEED_BATCH_SIZES, metavar="N,...",
                        help="batch sizes timed, one images_per_s_bN column each; speedup is at the largest "
                             f"(default: {','.join(map(str, SPEED_BATCH_SIZES))})")
    parser.add_argument("--speed-repeats", type=positive_int, default=5,
                        help="timing rounds, each timing every row once, in turns (default: %(default)s)")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing columns")
    parser.add_argument("--compile", action="store_true",
                        help="time each row's forward compiled by torch.compile (CUDA graphs on a GPU); compiling "
                             "takes 30 s to 2 min per row on a 2-core CPU")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the Random baseline (default: 0)")
    parser.add_argument("--output-dir", type=lambda text: Path(output_directory(text)), default=Path("results"),
                        help="default: %(default)s")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results files (results.csv, .json, .md, predictions.csv.gz, the plot) of an "
                             "earlier run")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    return parser


def _budgets(text: str) -> list[float]:
    """``0.3,0.5,0.7`` -> sorted distinct ratios."""
    return sorted(set(removal_ratios(text)))


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``1,256,1024`` -> the distinct batch sizes, ascending."""
    sizes = sorted({positive_int(part.strip()) for part in text.split(",") if part.strip()})
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected batch sizes, comma-separated, got {text!r}")
    return tuple(sizes)


def _cascade_ratios(text: str) -> tuple[float, float]:
    """``0.35,0.1`` -> the removal ratios of a cascade's first and second forwards."""
    ratios = removal_ratios(text)
    if len(ratios) != 2:
        raise argparse.ArgumentTypeError(f"expected two removal ratios, FIRST,SECOND, got {text!r}")
    return ratios


def _checkpoints_per_budget(text: str) -> dict[float, Path]:
    """``0.3=PATH,0.7=PATH`` -> ``{0.3: PATH, 0.7: PATH}``. A comma starts a pair only before ``RATIO=``: the
    trial directories of a sweep over several settings have commas in their names (``target_ratio=0.3,lr=0.001``)."""
    out: dict[float, Path] = {}
    pairs = re.split(r",(?=\s*[-+.\deE]*\s*=)", text.strip().rstrip(","))  # a ratio may be mistyped or missing
    for part in filter(None, (part.strip() for part in pairs)):
        ratio, sep, path = part.partition("=")
        try:
            if not sep or not path.strip():
                raise argparse.ArgumentTypeError("no path")
            budget = removal_ratio(ratio)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"expected RATIO=PATH pairs (such as 0.3=runs/marl/checkpoint), got "
                                             f"{part!r} ({error})") from None
        if budget in out:
            raise argparse.ArgumentTypeError(f"budget {budget:g} is given twice")
        out[budget] = Path(path.strip())
    return out


def check_flags(args: argparse.Namespace, given: Collection[str]) -> None:
    """An :class:`EvaluationError` for flags that contradict each other, or a flag ``given`` on the command line
    (:func:`cli.given_flags`) that the other flags leave without effect: a flag ignored without a word would
    leave its user reading results of settings they did not ask for."""
    def refuse(flags: Iterable[str], reason: str) -> None:
        named = [flag for flag in flags if flag in given]
        if named:
            raise EvaluationError(f"{flag_name(named[0])} {reason}")

    if args.cascade and args.split == "val":
        raise EvaluationError("the cascade is calibrated on the validation split: evaluate it on --split test")
    if not args.cascade:
        refuse(("cascade_points", "calibration_images"), "is for --cascade FIRST,SECOND, which was not given")
    if args.heuristics_only:
        refuse(("checkpoint", "checkpoints_per_budget"), "names a policy checkpoint: --heuristics-only evaluates none")
    else:
        refuse(("prune_points",), "is for --heuristics-only: a checkpoint prunes where it was trained to")
    if args.split == "val":
        refuse(("selection_images",), "is for --split test: with --split val, the heuristic that learned rows are "
                                      "compared with is chosen on the evaluated images")
    elif args.heuristics_only and not args.cascade:
        refuse(("selection_images",), "chooses the heuristic that learned rows and --cascade are compared with: "
                                      "--heuristics-only without --cascade has none")
    if args.no_speed:
        refuse(("speed_repeats", "speed_batch_sizes", "compile"), "is for the timing columns, which --no-speed skips")


def run(args: argparse.Namespace, given: Collection[str]) -> int:
    """Check everything that can fail cheaply, then evaluate, print and write; nothing written on error. ``given``:
    the flags the command line named (:func:`cli.given_flags`)."""
    check_flags(args, given)
    device = resolve_device(args.device)
    problem, policies = policies_to_evaluate(args)
    check_results_directory(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoints = {path: (modules, info) for modules, info, path in policies.values()}  # one may serve budgets
    staged, backbone_config, backbone_path = backbone_to_evaluate(args, problem, checkpoints)
    cascade = plan_cascade(args, problem, staged, policies)
    compared = bool(policies or cascade)  # rows compared with the best heuristic at their budget
    splits = evaluation_splits(args, problem, backbone_config, backbone_path, checkpoints, compared=compared,
                               calibrated=cascade is not None)
    methods = plan_methods(args.budgets, {b: (m, info.problem) for b, (m, info, _) in policies.items()}, cascade)
    reduction = args.reduction or problem.reduction
    evaluation = evaluate_methods(staged, backbone_config, splits.evaluated, methods, reduction,
                                  batch_size=args.batch_size, seed=args.seed,
                                  speed_repeats=None if args.no_speed else args.speed_repeats,
                                  speed_batch_sizes=args.speed_batch_sizes, device=device, dtype=DTYPES[args.dtype],
                                  calibration=splits.calibration, selection=splits.selection,
                                  compile_speed=args.compile)
    warn_of_dear_cascades(evaluation.table, evaluation.methods)
    settings = results_settings(args, policies, backbone_path, staged.prune_points, reduction, device, cascade,
                                splits, evaluation, compared=compared)
    print(f"{header_line(settings)}\n\n{markdown_table(evaluation.table)}")
    paths = write_results(evaluation.table, args.output_dir, settings, evaluation.predictions)
    print("\nwrote " + ", ".join(str(path) for path in paths))
    return 0


def policies_to_evaluate(args: argparse.Namespace) -> tuple[PruningProblem, dict[float, LoadedPolicy]]:
    """The problem the rows are evaluated on and the checkpoints by the budget each is evaluated at: none with
    ``--heuristics-only`` (:func:`heuristics_problem`); else ``--checkpoint``'s problem, with it at its own
    target ratio and at those of ``--budgets`` it was trained at (``train.py --train-ratios``), and
    ``--checkpoints-per-budget`` at theirs (:func:`load_policies_by_budget`)."""
    if args.heuristics_only:
        return heuristics_problem(args), {}
    if args.checkpoint == DEFAULT_CHECKPOINT and not DEFAULT_CHECKPOINT.exists():
        if installed_without_repository():
            raise EvaluationError(f"no policy checkpoint at {DEFAULT_CHECKPOINT}, the default: {NOT_A_CLONE}")
        raise EvaluationError(f"no policy checkpoint at {DEFAULT_CHECKPOINT} (the default; train one with "
                              "train.py and pass --checkpoint PATH)")
    policies = load_policies_by_budget(args.checkpoint, args.checkpoints_per_budget,
                                       same_backbone=not args.backbone, same_reduction=not args.reduction)
    problem = next(iter(policies.values()))[1].problem
    for budget in set(args.budgets) & {budget_key(ratio) for ratio in problem.train_ratios} - set(policies):
        policies[budget] = policies[budget_key(problem.target_ratio)]
    return problem, policies


def heuristics_problem(args: argparse.Namespace) -> PruningProblem:
    """What a ``--heuristics-only`` run evaluates, in place of a checkpoint's problem: ``--backbone`` (default: the
    reference) on its data set and the validation split it held out, pruned at ``--prune-points`` with
    ``--reduction`` (default: merge); its budget (the cascade's) is the middle one of ``--budgets`` (of an even
    number, the upper of the two middle ones)."""
    backbone = Path(args.backbone).expanduser() if args.backbone else REFERENCE_BACKBONE
    if holds_policies(backbone):
        raise EvaluationError(f"--backbone {backbone} is a policy checkpoint: evaluate it with --checkpoint {backbone} "
                              f"(without --heuristics-only)")
    given = {"dataset": args.dataset, "prune_points": args.prune_points,
             "reduction": args.reduction}  # the others: the problem's defaults
    problem = PruningProblem(backbone=repository_relative(backbone), target_ratio=args.budgets[len(args.budgets) // 2],
                             **{name: value for name, value in given.items() if value is not None})
    return problem.on_backbone_data(["dataset"] if args.dataset else [])


LoadedPolicy = tuple[dict[str, TokenScoring], CheckpointInfo, Path]
"""A checkpoint's policy modules (by policy name), what its ``pruning_config.json`` says, and its path."""


def load_policies_by_budget(main: Path, extras: Mapping[float, Path], *, same_backbone: bool = True,
                            same_reduction: bool = True) -> dict[float, LoadedPolicy]:
    """The checkpoint ``main`` at its own target ratio and each of ``extras`` at the budget it is given for,
    as ``{budget: (modules, info, path)}``, ``main`` first.

    Results are only comparable on one backbone, pruning schedule and reduction: every extra checkpoint must
    share the main one's pruning points and, where ``same_backbone`` / ``same_reduction``, its backbone and
    reduction.
    """
    modules, info = load_policies(main)
    policies = {budget_key(info.problem.target_ratio): (modules, info, Path(main))}
    problem = info.problem
    for budget, path in extras.items():
        if budget in policies:
            raise PolicyCheckpointError(f"budget {budget:g} is the main checkpoint's own target_ratio")
        extra_modules, extra = load_policies(path)
        other = extra.problem
        if other.prune_points != problem.prune_points:
            raise PolicyCheckpointError(f"checkpoint {path} prunes at {list(other.prune_points)}, the main one at "
                                        f"{list(problem.prune_points)}")
        if same_reduction and other.reduction != problem.reduction:
            raise PolicyCheckpointError(f"checkpoint {path} was trained to {other.reduction} tokens, the main one "
                                        f"to {problem.reduction} (pass --reduction to force one)")
        if same_backbone and other.backbone_path != problem.backbone_path:
            raise PolicyCheckpointError(f"checkpoint {path} was trained on backbone {other.backbone_path}, the main "
                                        f"one on {problem.backbone_path} (pass --backbone to force one)")
        if budget not in {budget_key(ratio) for ratio in other.ratios_trained}:
            trained = ", ".join(f"{ratio:g}" for ratio in other.ratios_trained)
            print(f"note: checkpoint {path} was trained at removal ratio {trained}; evaluating it at {budget:g}",
                  file=sys.stderr)
        policies[budget] = (extra_modules, extra, Path(path))
    return policies


def check_results_directory(args: argparse.Namespace) -> None:
    """An error for an ``--output-dir`` that cannot take the results, before anything is evaluated: one that is a
    checkpoint, or that holds an earlier run's results without ``--overwrite``."""
    output_dir = args.output_dir
    check_output_dir(output_dir, str(output_dir))
    if holds_policies(output_dir) or is_backbone_checkpoint(output_dir):
        raise EvaluationError(f"--output-dir {output_dir} is a checkpoint (a policy's or a backbone's): give the "
                              f"results a directory of their own")
    written = [output_dir / name for name in RESULT_FILES if (output_dir / name).exists()]
    if written and not args.overwrite:
        raise EvaluationError(f"{written[0]} exists; pass --overwrite to replace it")


def backbone_to_evaluate(args: argparse.Namespace, problem: PruningProblem,
                         checkpoints: Mapping[Path, tuple[Modules, CheckpointInfo]]
                         ) -> tuple[StagedViT, dict[str, Any], Path]:
    """The backbone the rows run on, its config and path (``policies.pruned_vit.checked_backbone``). Where the
    default ``--checkpoint`` does not fit it, the error says the reference policy needs the reference backbone."""
    try:
        return checked_backbone(problem, checkpoints, args.backbone)
    except PolicyCheckpointError as error:
        if args.checkpoint != DEFAULT_CHECKPOINT or args.heuristics_only:
            raise
        raise EvaluationError(f"{error} (the default --checkpoint is the reference policy, trained on the reference "
                              f"backbone: train one on yours with train.py --backbone and pass --checkpoint)") from None


def plan_cascade(args: argparse.Namespace, problem: PruningProblem, staged: StagedViT,
                 policies: Mapping[float, LoadedPolicy]) -> tuple[float, CascadePasses] | None:
    """The budget and the passes of the cascade rows (:func:`plan_methods`), None without ``--cascade``; a note
    where the checkpoint at that budget has two agents that prune elsewhere, so that its cascade row is missing."""
    if not args.cascade:
        return None
    cascade_points = args.cascade_points or CASCADE_PRUNE_POINTS
    try:
        StagedViT(staged.vit, cascade_points)
    except UsageError as error:
        raise EvaluationError(f"--cascade-points: {error}") from None
    budget = budget_key(problem.target_ratio)
    _, info, path = policies.get(budget, (None, None, None))
    if info is not None and info.problem.agents == "both" and info.problem.prune_points != cascade_points:
        points = ",".join(map(str, info.problem.prune_points))
        print(f"note: no {CASCADE['policy']} row: the agents of {path} prune at {points}, the cascade at "
              f"{','.join(map(str, cascade_points))} (--cascade-points {points} runs them in it)", file=sys.stderr)
    return budget, CascadePasses(cascade_points, args.cascade)


@dataclass(frozen=True)
class EvaluationSplits:
    """The images a run reads (:func:`evaluation_splits`)."""

    dataset: str
    evaluated: ImageSplit
    """``--split``, the images the table is measured on."""
    calibration: ImageSplit | None
    """Validation images the cascade rows are calibrated on (None without a cascade)."""
    selection: ImageSplit | None
    """Validation images the best heuristic of each budget is chosen on (None: the evaluated images, or no row is
    compared with one)."""
    ranked: dict[str, int]
    """Per checkpoint, how many of the evaluated images ranked its run's checkpoints (:func:`ranked_images_evaluated`;
    none but on ``--split val``)."""


def evaluation_splits(args: argparse.Namespace, problem: PruningProblem, backbone_config: Mapping[str, Any],
                      backbone_path: Path, checkpoints: Mapping[Path, tuple[Modules, CheckpointInfo]], *,
                      compared: bool, calibrated: bool) -> EvaluationSplits:
    """The images to evaluate on and, held out from them on ``--split test``, those the best heuristic is chosen on
    where rows are ``compared`` with it and those a cascade is ``calibrated`` on; a note for each checkpoint whose
    run was ranked on some of the evaluated validation images. Errors name what to pass instead, and the validation
    split is checked before the test images are decoded."""
    dataset = args.dataset or problem.dataset

    def images(split_name: str, limit: int | None) -> ImageSplit:
        return load_checked_split(dataset, split_name, args.data_dir, backbone_config, val_size=problem.val_size,
                                  seed=problem.split_seed, limit=limit, **data_access(args))

    if args.split == "test" and compared:  # checked before the test images are decoded
        try:
            check_held_out("val", dataset, problem.val_size, problem.split_seed, backbone_config)
        except DataError as error:
            raise EvaluationError(f"{CHOSEN_ON_VALIDATION}: {error}") from None
    try:
        split = images(args.split, args.limit)
    except ClassesDiffer as error:
        default = args.heuristics_only and not args.backbone  # the reference backbone, for CIFAR-10
        raise DataError(f"{error}: the backbone is {backbone_path}"
                        + (" (the reference; pass yours with --backbone)" if default else "")) from None
    except DataError as error:
        recorded = Path(problem.data_dir).expanduser()
        if Path(args.data_dir).expanduser().exists() or not recorded.exists():
            raise
        raise DataError(f"{error} (the checkpoint was trained on the data in {recorded}: pass --data-dir "
                        f"{recorded})") from None
    if len(split) < 2:
        raise EvaluationError(f"{len(split)} image to evaluate: the paired intervals need at least 2")
    problems = {path: info.problem for path, (_, info) in checkpoints.items()}
    ranked = (ranked_images_evaluated(problems, problem.val_size, problem.split_seed, args.limit)
              if args.split == "val" else {})
    for path, count in ranked.items():
        if count:
            print(f"note: {count} of the {len(split)} validation images evaluated ranked the checkpoints of {path}'s "
                  f"run (train.py's --val-limit): its rows read high on them", file=sys.stderr)
    calibration = images("val", args.calibration_images) if calibrated else None
    try:
        selection = images("val", args.selection_images) if args.split == "test" and compared else None
    except DataError as error:
        raise EvaluationError(f"{CHOSEN_ON_VALIDATION}: {error}") from None
    return EvaluationSplits(dataset, split, calibration, selection, ranked)


def results_settings(args: argparse.Namespace, policies: Mapping[float, LoadedPolicy], backbone_path: Path,
                     prune_points: Sequence[int], reduction: str, device: torch.device,
                     cascade: tuple[float, CascadePasses] | None, splits: EvaluationSplits, evaluation: Evaluation, *,
                     compared: bool) -> dict[str, Any]:
    """What results.json records beside the table (and the header line above it says): what was evaluated, on
    which images, how, and with which code, so that a table can be told from another and reproduced."""
    split, calibration, selection = splits.evaluated, splits.calibration, splits.selection
    return {"checkpoints": {f"{b:g}": repository_relative(path) for b, (_, _, path) in policies.items()},
            "iterations": {f"{b:g}": info.iteration for b, (_, info, _) in policies.items()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": code_commit(),
            "backbone": repository_relative(backbone_path), "dataset": splits.dataset,
            "split": args.split, "images": len(split), "limit": args.limit,
            "class_names": list(split.class_names),  # the order of predictions.csv.gz's class numbers
            "prune_points": list(prune_points), "reduction": reduction,
            "budgets": sorted(set(args.budgets) | set(policies)), "seed": args.seed, "batch_size": args.batch_size,
            "device": describe_device(device), "dtype": args.dtype,
            "speed_repeats": None if args.no_speed else args.speed_repeats,
            "compiled": None if args.no_speed else args.compile,
            "speed_batch_sizes": list(args.speed_batch_sizes),
            "speed_images": None if args.no_speed else speed_note(len(split), args.speed_batch_sizes),
            "speed_rounds": evaluation.speed_rounds,
            "cascade": None if cascade is None else {"prune_points": list(cascade[1].prune_points),
                                                     "ratios": list(args.cascade),
                                                     "calibration_images": len(calibration)},
            "checkpoint_ranking_images_evaluated": splits.ranked or None,
            "best_heuristic_chosen_on": (None if not compared else f"{len(selection)} validation images"
                                         if selection is not None else "the evaluated images"),
            "torch_threads": torch.get_num_threads(), "versions": versions_line(),
            "arguments": {name: as_json(value) for name, value in sorted(vars(args).items())}}


def as_json(value: Any) -> Any:
    """An argument's value as results.json records it: numbers, strings, booleans and None as they are, sequences
    as lists, anything else (a path) as its string."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 2 with one ``error: ...`` line on stderr for bad input, 130 on
    Ctrl-C (the results are written at the end only, so nothing is)."""
    def body() -> int:
        parser = build_parser()
        return run(parser.parse_args(argv), given_flags(parser, argv))

    return run_command(body, lambda: "interrupted: nothing was written; run the command again")


if __name__ == "__main__":
    sys.exit(main())
