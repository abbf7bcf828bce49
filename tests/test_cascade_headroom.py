"""benchmarks/cascade_headroom.py's pure parts: which images a cascade runs twice, by which rule, and which pairs it
tries."""

import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.cascade_headroom import Pass, as_pass, cascade, cascade_pairs, fitted_doubt, rerun_gain


def constant_pass(predictions: list[int], gflops: float) -> Pass:
    """A pass sure of ``predictions`` (of 3 classes)."""
    return as_pass(10 * torch.nn.functional.one_hot(torch.tensor(predictions), 3).float(), gflops)


def test_a_pass_measures_how_unsure_each_answer_is():
    first = as_pass(torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.1, 0.0]]), 0.1)
    assert first.predictions.tolist() == [0, 1]
    assert first.doubt[0] < -0.9 and first.doubt[1] > -0.05


def test_cascade_reruns_the_most_doubtful_images_within_the_mean_budget():
    first, second = constant_pass([0] * 100, gflops=1.0), constant_pass([1] * 100, gflops=4.0)
    scores = torch.rand(100, generator=torch.Generator().manual_seed(0))
    predictions, rerun = cascade(first, second, budget=2.0, scores=scores)
    assert rerun.sum() == 25  # 1 + 25% of 4 = the budget exactly
    assert torch.equal(predictions, rerun.long())
    assert scores[rerun].min() > scores[~rerun].max()
    with pytest.raises(ValueError, match="nothing is left for a second"):  # the first pass spends the budget
        cascade(first, second, budget=1.0, scores=scores)


def test_the_default_rule_reruns_the_least_sure_answers():
    first = as_pass(torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 3.0], [0.0, 0.2]]), gflops=1.0)
    _, rerun = cascade(first, constant_pass([0] * 4, gflops=1.0), budget=1.5)
    assert rerun.tolist() == [False, True, False, True]


def test_rerun_gain_and_the_fitted_rule_learn_where_a_rerun_keeps_the_unpruned_answer():
    unpruned = constant_pass([0, 0, 0, 0], 2.0)
    assert rerun_gain(constant_pass([1, 0, 1, 0], 1.0), constant_pass([0, 0, 1, 1], 1.0), unpruned).tolist() == [
        1.0, 0.0, 0.0, -1.0]
    # the first forward is wrong exactly when it is unsure (class 1 with a small margin); the second always right
    generator = torch.Generator().manual_seed(0)
    unsure = torch.rand(200, generator=generator) < 0.3
    logits = torch.stack([torch.where(unsure, 0.0, 3.0), torch.where(unsure, 0.3, 0.0), torch.zeros(200)], dim=1)
    logits += 0.05 * torch.randn(200, 3, generator=generator)
    first, second, unpruned = as_pass(logits, 1.0), constant_pass([0] * 200, 1.0), constant_pass([0] * 200, 2.0)
    doubt = fitted_doubt((first, second, unpruned), first)
    assert doubt[unsure].min() > doubt[~unsure].max()


def test_the_trajectory_rule_learns_what_only_the_logit_lens_shows():
    # the first forward answers class 1 alike on every image, the second class 0; the unpruned model answers 0
    # (a rerun gains) exactly where the logit lens at the second pruning point leaned another way
    generator = torch.Generator().manual_seed(0)
    gains = torch.rand(300, generator=generator) < 0.3
    lens = torch.randn(300, 2, 6, generator=generator)
    lens[:, 1, 0] += 3 * gains
    first = as_pass(torch.tensor([0.0, 3.0, 0.0]) + 0.01 * torch.randn(300, 3, generator=generator), 1.0, lens)
    train = (first, constant_pass([0] * 300, 1.0), constant_pass(torch.where(gains, 0, 1).tolist(), 2.0))
    assert roc_auc_score(gains, fitted_doubt(train, first, with_trajectory=True)) > 0.95
    assert roc_auc_score(gains, fitted_doubt(train, first)) < 0.7


def test_cascade_pairs_spend_the_budget():
    passes = {name: constant_pass([0], gflops) for name, gflops in (("cheap", 1.0), ("mid", 2.0), ("dear", 4.0))}
    assert set(cascade_pairs(passes, 2.5)) == {("cheap", "mid"), ("cheap", "dear"), ("mid", "cheap"),
                                               ("mid", "mid"), ("mid", "dear")}
