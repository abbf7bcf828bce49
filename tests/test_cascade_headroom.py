"""benchmarks/cascade_headroom.py's pure parts: which images a cascade runs twice, and which pairs it tries."""

import torch

from benchmarks.cascade_headroom import Pass, as_pass, cascade, cascade_pairs


def test_as_pass_measures_how_sure_each_answer_is():
    first = as_pass(torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.1, 0.0]]), 0.1)
    assert first.predictions.tolist() == [0, 1]
    assert first.margins[0] > 0.9 and first.margins[1] < 0.05


def test_cascade_reruns_the_least_sure_images_within_the_mean_budget():
    margins = torch.rand(100, generator=torch.Generator().manual_seed(0))
    first = Pass(torch.zeros(100, dtype=torch.long), margins, gflops=1.0)
    second = Pass(torch.ones(100, dtype=torch.long), torch.ones(100), gflops=4.0)
    predictions, rerun = cascade(first, second, budget=2.0)
    assert rerun.sum() == 25  # 1 + 25% of 4 = the budget exactly
    assert torch.equal(predictions, rerun.long())
    assert margins[rerun].max() < margins[~rerun].min()
    predictions, rerun = cascade(first, second, budget=1.0)  # no room: the first pass's answers
    assert not rerun.any() and not predictions.any()


def test_cascade_pairs_spend_the_budget():
    passes = {name: Pass(torch.zeros(1), torch.zeros(1), gflops) for name, gflops in
              (("cheap", 1.0), ("mid", 2.0), ("dear", 4.0))}
    assert set(cascade_pairs(passes, 2.5)) == {("cheap", "mid"), ("cheap", "dear"), ("mid", "cheap"),
                                               ("mid", "mid"), ("mid", "dear")}
