"""How learned and cascade rows are compared with heuristic ones: the most accurate heuristic at each budget,
chosen on images other than those the comparison is made on (:func:`best_heuristics`), and the paired bootstrap
interval of the difference in accuracy with it and with ToMe (:func:`paired_difference`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.stats
import torch

from envs.vit.data import ImageSplit
from envs.vit.scoring import percent_equal
from evaluation.methods import HEURISTIC_ROWS, Method
from evaluation.predictions import predict
from policies.cascade import CascadeViT
from policies.pruned_vit import PrunedViT

BOOTSTRAP_RESAMPLES = 2000


def versus_best_heuristics(methods: Sequence[Method], outputs: Mapping[Method, tuple], labels: torch.Tensor,
                           build: Callable[[Method], PrunedViT | CascadeViT], selection: ImageSplit | None,
                           batch_size: int, progress: bool = False) -> dict[Method, dict[str, float | str]]:
    """For each learned and cascade row of ``methods``, its columns against the most accurate other heuristic at
    its budget and against ToMe (:func:`versus_heuristics`, on the evaluated images' ``outputs`` and ``labels``).
    The heuristic is chosen (:func:`best_heuristics`) on the ``selection`` images, by heuristic models made afresh
    by ``build``, so that the Random row draws there as it draws in the table; without them, on the evaluated
    images. ``progress``: a progress bar over the selection images."""
    compared = [method for method in methods if method.selection in ("policy", "cascade")]
    if not compared:
        return {}
    if selection is None:
        ranking = best_heuristics(outputs, labels)
    else:
        heuristics = {method: build(method) for method in methods if is_heuristic(method)}
        task = f"choosing the best heuristic on {len(selection)} held-out images" if progress else None
        ranking = best_heuristics(predict(heuristics, selection, batch_size, task), selection.labels)
    return {method: versus_heuristics(method, next(m for m in ranking[method.budget] if m is not method), methods,
                                      outputs, labels) for method in compared}


def best_heuristics(outputs: Mapping[Method, tuple], labels: torch.Tensor) -> dict[float, list[Method]]:
    """Per budget, the heuristic rows of ``outputs`` (:func:`predict`'s; greedy similarity's cascade included),
    most accurate on ``labels`` first, equals in table order: the first is what learned rows are compared with
    (the next, for the heuristic cascade row when it is the first). Chosen on images other than those the
    comparison is made on, the reference is not the one whose noise happened to favour it there (the best of
    several rows on the same images reads above its true accuracy)."""
    heuristics = [method for method in outputs if is_heuristic(method)]
    accuracy = {method: percent_equal(outputs[method][0], labels) for method in heuristics}
    ranking: dict[float, list[Method]] = {}
    for method in sorted(heuristics, key=lambda m: -accuracy[m]):  # stable: equals stay in table order
        ranking.setdefault(method.budget, []).append(method)
    return ranking


def is_heuristic(method: Method) -> bool:
    """Whether a row's tokens are chosen by a rule, not by trained agents (the baseline is not pruned)."""
    return method.selection in HEURISTIC_ROWS or (method.selection == "cascade" and not method.modules)


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


def paired_difference(correct: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """The accuracy of ``correct [n]`` (0/1 per image) minus that of ``reference [n]`` on the same images, and
    the paired bootstrap 95% interval of the difference (the images resampled for both), in points."""
    result = scipy.stats.bootstrap((correct, reference), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                                   paired=True, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
                                   method="percentile", rng=np.random.default_rng(0))
    low, high = result.confidence_interval
    return float(100 * (correct.mean() - reference.mean())), float(100 * low), float(100 * high)
