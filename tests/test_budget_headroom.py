"""benchmarks/budget_headroom.py's pure parts: the token schedule of a level, and the allocation of two levels
that must keep the mean cost within the exact budget's."""

import numpy as np
import pytest

from benchmarks.budget_headroom import allocation, schedule
from benchmarks.split_states import first_stage_states
from envs.problem import PruningProblem
from envs.vit.data import DataError


def test_schedule_prunes_at_the_exact_ratio_before_the_decision_and_at_the_level_after():
    assert schedule(64, 3, 0, 0.5, 0.8) == [64, 13, 3, 1]
    assert schedule(64, 3, 1, 0.5, 0.8) == [64, 32, 6, 1]
    assert schedule(64, 3, 2, 0.5, 0.2) == [64, 32, 16, 13]


def test_allocation_gives_the_cheap_level_to_the_highest_scores_within_the_budget():
    costs = np.array([1.0, 2.0, 4.0])  # levels 0 (cheap), 1 (the exact budget), 2 (dear)
    scores = np.random.default_rng(0).random(101)
    for cheap, dear in ((0, 2), (0, 1), (1, 2)):
        for budget in (1.5, 2.0, 3.1):
            if not costs[cheap] < budget < costs[dear]:
                continue
            levels = allocation(scores, cheap, dear, costs, budget)
            assert set(levels) == {cheap, dear} and costs[levels].mean() <= budget
            assert costs[levels].mean() > budget - (costs[dear] - costs[cheap]) / len(scores)  # no cheap slot unused
            assert scores[levels == cheap].min() > scores[levels == dear].max()


def test_the_headroom_benchmarks_refuse_validation_images_the_backbone_trained_on(tiny_staged, data_dir):
    """Their images come through load_checked_split, as train.py's and evaluate.py's do: a backbone that held out
    2,000 images drawn with another seed would score its own training images here."""
    staged, config = tiny_staged
    config = {**config, "split_seed": 1, "split_sizes": {"train": 48000, "val": 2000}}
    with pytest.raises(DataError, match="would hold images the backbone trained on: it held out 2000 images"):
        first_stage_states(staged, config, PruningProblem(), data_dir, "val", 8)
