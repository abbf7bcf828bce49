"""Warm start: the imitation data are the heuristics' choices, split between the agents as their turns are, and
cloning fits them (train.py starting PPO from the clones: tests/test_train.py)."""

from __future__ import annotations

import pytest
import timm
import torch

from envs.vit.features import SIMILARITY_FEATURES
from envs.vit.pruned_forward import exact_forward
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest
from policies.decisions import take_turns
from policies.rl_module import policy_module_spec
from policies.warm_start import clone_module, imitated_selector, imitation_data
from tests.conftest import TINY_KWARGS


@pytest.fixture(scope="module")
def staged() -> StagedViT:
    """The tiny ViT, seeded, split at blocks 1, 2 and 3 (no test changes it: imitation and forwards only read it)."""
    torch.manual_seed(0)
    return StagedViT(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS).eval(), (1, 2, 3))


def test_imitation_data_follow_the_turns_and_cloning_fits_them(staged):
    torch.manual_seed(0)
    demonstration = imitation_data(staged, torch.randn(6, 3, 32, 32), (0.5,), "merge", "nms", "both", 0.25,
                                   batch_size=4)  # two batches: the rows come batch by batch, point by point
    live_per_point = [64, 32, 16]

    def per_row(fraction):
        return [n * fraction for batch in (4, 2) for n in live_per_point for _ in range(batch)]

    attention_features, live, kept = demonstration["attention"]
    assert attention_features.shape[:2] == (18, 64)  # two batches (4 and 2 images), three points each
    # the attention agent chooses from every live token and keeps a quarter of the budget's count
    assert live.sum(1).tolist() == per_row(1) and kept.sum(1).tolist() == per_row(1 / 8)
    assert (kept * (1 - live)).sum() == 0
    features, left, redundant = demonstration["similarity"]
    assert features.shape == (18, 64, len(SIMILARITY_FEATURES))
    # the similarity agent removes the budget's count among the tokens the attention agent did not keep
    assert torch.equal(left, live - kept) and redundant.sum(1).tolist() == per_row(1 / 2)
    assert (redundant * (1 - left)).sum() == 0
    suppressed = features[..., SIMILARITY_FEATURES.index("suppression")]
    for row in range(len(left)):  # attention NMS removes the most suppressed tokens: the feature encodes it
        removed, stays = suppressed[row][redundant[row].bool()], suppressed[row][(left - redundant)[row].bool()]
        assert removed.min() >= stays.max()

    module = policy_module_spec("similarity", 64, {"hidden": 16}).build()
    before = clone_module(module, features, left, redundant, steps=0)
    after = clone_module(module, features, left, redundant, steps=150)
    assert before < 0.7 < 0.9 <= after


def test_a_pruning_point_that_removes_nothing_gives_the_similarity_agent_no_row(staged):
    torch.manual_seed(0)
    demonstration = imitation_data(staged, torch.randn(3, 3, 32, 32), (0.9,), "merge", "distinct", "both", 0.1)
    _, live, _ = demonstration["attention"]
    assert live.sum(1).tolist() == [64] * 3 + [6] * 3 + [1] * 3  # the last point keeps its one token
    _, left, removed = demonstration["similarity"]
    assert len(left) == 6 and removed.sum(1).tolist() == [58] * 3 + [5] * 3


def test_imitation_at_several_ratios_deals_the_images_out_among_them(staged):
    """Each image is imitated at one ratio, in turn: the rows of each ratio carry its keep fraction and counts."""
    torch.manual_seed(0)
    features, live, removed = imitation_data(staged, torch.randn(5, 3, 32, 32), (0.25, 0.75), "merge", "distinct",
                                             "similarity", 0.1)["similarity"]
    # images 0, 2, 4 at 0.25, then 1 and 3 at 0.75; a row per image and point, point by point
    keep_fraction = features[:, 0, SIMILARITY_FEATURES.index("keep_fraction")]
    assert keep_fraction.tolist() == [0.75] * 9 + [0.25] * 6
    assert live.sum(1).tolist() == [64] * 3 + [48] * 3 + [36] * 3 + [64] * 2 + [16] * 2 + [4] * 2
    assert removed.sum(1).tolist() == [16] * 3 + [12] * 3 + [9] * 3 + [48] * 2 + [12] * 2 + [3] * 2


def test_the_imitated_selector_makes_the_choices_the_clones_are_fitted_to(staged):
    """What learned_vs_warm_start compares with: the same turns, at every pruning point, as imitation_data."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    demonstration = imitation_data(staged, images, (0.5,), "merge", "nms", "both", 0.25)
    _, live, kept = demonstration["attention"]
    _, _, removed = demonstration["similarity"]
    chosen = []

    def recording(state, k):
        keep = imitated_selector(0.5, "nms", "both", 0.25)(state, k)
        chosen.append(keep)
        return keep

    exact_forward(staged, images, recording, 0.5, "merge")
    rows = torch.cat([torch.nn.functional.pad(keep, (0, 64 - keep.shape[1])) for keep in chosen]).float()
    assert torch.equal(rows, live - removed)  # both point by point, the batch's images in each
    assert ((rows - kept) < 0).sum() == 0  # the attention agent's tokens are kept


def test_the_turn_rule_gives_each_agent_its_count_and_keeps_the_attention_agents_tokens():
    """``take_turns``, the one rule behind both the agents' most likely sets and the heuristics they imitate."""
    live = torch.ones(2, 12, dtype=torch.bool)
    attention_scores, similarity_scores = torch.randn(2, 12), torch.randn(2, 12)
    similarity_scores[:, :3] = 10.0  # the similarity agent would remove these first

    def keep_by_attention(tokens, count):
        return highest(attention_scores.masked_fill(~tokens, -1e9), count)

    def remove_by_similarity(tokens, count):
        return highest(similarity_scores.masked_fill(~tokens, -1e9), count)

    both = take_turns(live, 0.5, 0.5, keep_by_attention, remove_by_similarity)  # keeps 6: 3 by attention
    assert both.kept.sum(1).tolist() == [3, 3] and both.removed.sum(1).tolist() == [6, 6]
    assert torch.equal(both.left, live & ~both.kept) and not (both.removed & both.kept).any()
    assert torch.equal(both.survivors, live & ~both.removed) and both.survivors.sum(1).tolist() == [6, 6]
    assert torch.equal(both.kept & both.survivors, both.kept)
    alone = take_turns(live, 0.5, 0.5, keep_by_attention, None)
    assert alone.removed is None and torch.equal(alone.survivors, alone.kept) and alone.kept.sum(1).tolist() == [6, 6]
    alone = take_turns(live, 0.5, 0.5, None, remove_by_similarity)
    assert alone.kept is None and alone.survivors[:, :3].sum() == 0 and alone.survivors.sum(1).tolist() == [6, 6]
    nothing_to_remove = take_turns(live, 0.0, 0.5, keep_by_attention, remove_by_similarity)
    assert nothing_to_remove.removed is None and nothing_to_remove.survivors.all()
