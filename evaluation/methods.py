"""The rows of evaluate.py's table: how each chooses tokens and at which budget (:class:`Method`), the rows of
a run in table order (:func:`plan_methods`), and what sets a row's cost before it is measured: ToMe matched to
the rows beside it (:func:`match_tome_cost`) and each cascade calibrated on held-out images
(:func:`calibrate_cascades`), then checked against what it cost (:func:`warn_of_dear_cascades`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from envs.errors import UsageError
from envs.problem import PruningProblem
from envs.vit.data import ImageSplit
from envs.vit.flops import ViTSpec, unpruned_gflops
from envs.vit.staged_vit import StagedViT
from envs.vit.tome import tome_schedule
from evaluation import EvaluationError
from evaluation.predictions import normalized_batches
from evaluation.results_table import BASELINE
from policies.cascade import CascadeViT
from policies.checkpoints import Modules
from policies.decisions import DEFAULT_PROTECTED_SHARE
from policies.heuristics import HEURISTIC_RULES
from policies.pruned_vit import PrunedViT, greedy_similarity_gflops

HEURISTIC_ROWS = {**{name: rule.label for name, rule in HEURISTIC_RULES.items()}, "tome": "ToMe"}
MARL_EXACT = "MARL exact"
MARL_ONLY = {"attention": "MARL attention only", "similarity": "MARL similarity only"}
CASCADE = {"similarity": "Cascade (greedy similarity)", "policy": "MARL cascade"}


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
            unpruned = unpruned_gflops(spec)
            warnings.warn(f"ToMe at {budget:g} is the unpruned model: the rows it is matched to cost {gflops:.4g} "
                          f"GFLOPs, about the unpruned model's {unpruned:.4g} or more (the agents' networks outweigh "
                          f"this ViT), so it merges no token", stacklevel=2)
    return [replace(method, tome_gflops=matched[method.budget]) if method.selection == "tome" else method
            for method in methods]


def calibrate_cascades(methods: Sequence[Method], staged: StagedViT, backbone_config: Mapping[str, Any],
                       reduction: str, calibration: ImageSplit | None, batch_size: int,
                       progress: bool = False) -> list[Method]:
    """``methods`` with each cascade row's threshold calibrated on the ``calibration`` images (held out from
    those evaluated) so that its mean GFLOPs per image are greedy similarity's at its budget; ``progress``: a
    progress bar over them."""
    calibrated = []
    for method in methods:
        if method.selection == "cascade":
            if calibration is None:
                raise EvaluationError("a cascade row needs calibration images")
            model = method.model(staged, backbone_config, reduction)
            target = greedy_similarity_gflops(staged, method.budget, reduction)
            task = f"calibrating {method.name} on {len(calibration)} held-out images" if progress else None
            batches = normalized_batches(model, calibration, batch_size, task)
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
    ``evaluation.measure.evaluate_methods`` returns them) whose measured GFLOPs are more than
    :data:`CASCADE_COST_TOLERANCE` above those it was calibrated to (``CascadePasses.target_gflops``): more of the
    evaluated images than of the calibration images ran twice (few of either), and it is compared with rows cheaper
    than itself."""
    for row, method in zip(table.itertuples(), methods, strict=True):
        if method.cascade is None:
            continue
        target = method.cascade.target_gflops
        if row.gflops > (1 + CASCADE_COST_TOLERANCE) * target:
            warnings.warn(f"{row.method} at {row.budget:g} cost {row.gflops:.4f} GFLOPs, "
                          f"{100 * (row.gflops / target - 1):.0f}% above the {target:.4f} it was calibrated to: "
                          f"more images ran twice than in calibration (more --calibration-images or more evaluated "
                          f"images narrow the gap)", stacklevel=2)
