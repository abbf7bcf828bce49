"""Token budget, token ops, and the heuristic selectors: exact counts, live tokens only, prefix kept."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from envs.vit.flops import exact_budget_schedule
from envs.vit.pruned_forward import exact_forward
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import gather_tokens, highest, pack_keep_mask, pad_tokens, tokens_to_keep
from policies.heuristics import (
    HEURISTICS,
    attention_nms_keep,
    distinctive_nms_keep,
    greedy_attention_keep,
    greedy_similarity_keep,
    heuristic_selector,
    random_keep,
    redundancy,
)
from tests.conftest import TINY_KWARGS


@pytest.mark.parametrize(("num_live", "ratio", "expected"), [
    (64, 0.5, 32), (64, 0.3, 45), (64, 0.7, 19), (64, 0.9, 6), (6, 0.9, 1), (1, 0.5, 1),
    (5, 0.5, 2),  # Python's round: half to even
])
def test_tokens_to_keep(num_live, ratio, expected):
    assert tokens_to_keep(num_live, ratio) == expected


def test_gather_tokens_keeps_prefix():
    x = torch.arange(2 * 7 * 1).float().reshape(2, 7, 1)  # 2 prefix + 5 patch tokens
    out = gather_tokens(x, torch.tensor([[0, 4], [1, 2]]), num_prefix=2)
    assert out[..., 0].tolist() == [[0, 1, 2, 6], [7, 8, 10, 11]]


def test_highest_live_only():
    scores = torch.tensor([[5.0, 1.0, 9.0, 3.0, float("-inf")]])
    live = torch.tensor([[True, True, False, True, True]])
    assert highest(scores, 2, live).tolist() == [[True, False, False, True, False]]
    assert highest(scores, 4, live).tolist() == [[True, True, False, True, True]]  # live -inf beats dead
    with pytest.raises(ValueError, match=r"count must be in \[1, 4\]"):
        highest(scores, 5, live)


def test_pack_keep_mask():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False], [True, True, True, True]])
    live = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, True]])
    index, live_after = pack_keep_mask(keep, live)
    assert index.tolist() == [[0, 2, 0, 0], [1, 0, 0, 0], [0, 1, 2, 3]]
    assert live_after.tolist() == [[True, True, False, False], [True, False, False, False], [True] * 4]


def test_pad_tokens():
    x = torch.ones(2, 3, 4)
    assert pad_tokens(x, 5).shape == (2, 5, 4) and pad_tokens(x, 5)[:, 3:].abs().sum() == 0
    assert pad_tokens(torch.ones(2, 3, dtype=torch.bool), 4).tolist() == [[True] * 3 + [False]] * 2
    assert pad_tokens(x, 3) is x


def assert_valid_keep(keep: torch.Tensor, live: torch.Tensor, k: int) -> None:
    assert keep.shape == live.shape and keep.dtype == torch.bool
    assert (keep.sum(dim=1) == k).all() and not (keep & ~live).any()


@pytest.fixture()
def batch():
    gen = torch.Generator().manual_seed(0)
    live = torch.rand(4, 20, generator=gen) < 0.7
    live[:, :8] = True  # at least 8 live per image
    return torch.randn(4, 20, 16, generator=gen), torch.rand(4, 20, generator=gen), live


@pytest.mark.parametrize("k", [1, 3, 8])
def test_selectors_exact_budget_live_only(batch, k):
    x, attention, live = batch
    for keep in (random_keep(live, k, torch.Generator().manual_seed(1)),
                 greedy_attention_keep(attention, live, k),
                 greedy_similarity_keep(x, live, k),
                 attention_nms_keep(x, attention, live, k),
                 distinctive_nms_keep(x, live, k)):
        assert_valid_keep(keep, live, k)


def test_greedy_attention_is_top_k(batch):
    _, attention, live = batch
    keep = greedy_attention_keep(attention, live, 5)
    for i in range(4):
        live_scores = attention[i][live[i]]
        assert attention[i, keep[i]].min() >= live_scores.topk(5).values.min()


def test_random_keep_is_reproducible(batch):
    live = batch[2]
    first = random_keep(live, 5, torch.Generator().manual_seed(3))
    assert torch.equal(first, random_keep(live, 5, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, random_keep(live, 5, torch.Generator().manual_seed(4)))


def reference_greedy_similarity(x: torch.Tensor, live: torch.Tensor, k: int) -> list[int]:
    """One image, plain Python: drop the remaining token with the highest (max, summed) similarity."""
    unit = F.normalize(x, dim=-1)
    sim = unit @ unit.T
    sim = ((sim + sim.T) / 2).tolist()
    remaining = live.nonzero().flatten().tolist()
    while len(remaining) > k:
        def redundancy(i):
            others = [sim[i][j] for j in remaining if j != i]
            return max(others), sum(others)
        remaining.remove(max(remaining, key=redundancy))
    return remaining


def test_greedy_similarity_matches_reference(batch):
    x, _, live = batch
    keep = greedy_similarity_keep(x, live, 4)
    assert [row.nonzero().flatten().tolist() for row in keep] == [
        reference_greedy_similarity(x[i], live[i], 4) for i in range(4)]


def test_greedy_similarity_drops_duplicates_first():
    e = torch.eye(4)
    x = torch.stack([e[0], e[1], 1.01 * e[0], e[2], e[1] + 0.01 * e[3]]).unsqueeze(0)
    keep = greedy_similarity_keep(x, torch.ones(1, 5, dtype=torch.bool), 3)
    kept = F.normalize(x[0, keep[0]], dim=-1)
    assert (kept @ kept.T - torch.eye(3)).abs().max() < 0.1  # one of each direction survives


@pytest.fixture(scope="module")
def staged():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", reg_tokens=2, num_classes=10, **TINY_KWARGS).eval()
    return StagedViT(vit, (1, 2, 3))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("name", HEURISTICS)
def test_exact_forward_counts(staged, name, ratio):
    select, kept = heuristic_selector(name), []

    def counted(state, k):  # the live tokens each image keeps at each pruning point
        keep = select(state, k)
        kept.append((keep & state.live).sum(dim=1).tolist())
        return keep

    with torch.no_grad():
        logits = exact_forward(staged, torch.randn(2, 3, 32, 32), counted, ratio, "merge")
    assert [[k] * 2 for k in exact_budget_schedule(64, 3, ratio)[1:]] == kept
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["similarity", "nms", "distinct"])
def test_redundancy_orders_the_removals_of_each_similarity_heuristic(staged, name):
    """Removing the most redundant tokens leaves the heuristic's keep set, at every budget (nested sets)."""
    recorded = []
    with torch.no_grad():
        exact_forward(staged, torch.randn(3, 3, 32, 32), lambda state, k: recorded.append(state) or
                      heuristic_selector(name)(state, k), 0.5, "merge")
    state = recorded[1]
    for k in (1, 5, 16, 31):
        assert torch.equal(highest(-redundancy(name, state), k, state.live), heuristic_selector(name)(state, k))
    with pytest.raises(ValueError, match="not a similarity heuristic"):
        redundancy("attention", state)


def test_exact_forward_keeps_prefix_and_tracks_positions(staged):
    seen, tokens_in = [], []

    def select(state, k):  # the last k live tokens
        seen.append((state, k))
        return torch.zeros_like(state.live).index_fill(1, torch.arange(state.live.shape[1] - k, state.live.shape[1]),
                                                       True)

    hooks = [staged.vit.blocks[i].norm1.register_forward_pre_hook(
        lambda module, args: tokens_in.append(args[0].shape[1])) for i in range(staged.depth)]
    try:
        with torch.no_grad():
            exact_forward(staged, torch.randn(2, 3, 32, 32), select, 0.5, "drop")
    finally:
        for hook in hooks:
            hook.remove()
    assert tokens_in == [3 + 64, 3 + 32, 3 + 16, 3 + 8]  # class + 2 register tokens always stay
    assert [state.stage for state, _ in seen] == [0, 1, 2] and [k for _, k in seen] == [32, 16, 8]
    assert seen[-1][0].positions[0].tolist() == list(range(48, 64))  # alive in stage 2: the last 16
    assert all(state.live.all() and state.cls_attention.shape == state.live.shape for state, _ in seen)


def test_selector_errors(staged):
    with pytest.raises(ValueError, match="unknown heuristic"):
        heuristic_selector("magic")

    def one_too_many(state, k):
        return highest(state.cls_attention, k + 1, state.live)

    with pytest.raises(ValueError, match="a selector must keep exactly 32 live tokens"):
        exact_forward(staged, torch.randn(1, 3, 32, 32), one_too_many, 0.5, "merge")


def test_attention_nms_keeps_the_most_attended_of_each_near_duplicate_group():
    e = torch.eye(4)
    x = torch.stack([e[0], 1.01 * e[0], e[1], e[1] + 0.01 * e[2], e[3]]).unsqueeze(0)
    attention = torch.tensor([[0.1, 0.3, 0.2, 0.05, 0.35]])
    keep = attention_nms_keep(x, attention, torch.ones(1, 5, dtype=torch.bool), 3)
    assert keep[0].tolist() == [False, True, True, False, True]


def test_distinctive_nms_keeps_the_more_distinctive_of_each_near_duplicate_pair():
    """Of a near-duplicate pair, the member less similar to all the others stays (greedy similarity's
    tie-break), in one shot; a token unlike every other stays."""
    e = torch.eye(4)
    # tokens 0 and 1 nearly equal; 1 leans towards token 2, so it is the less distinctive of the pair
    x = torch.stack([e[0], e[0] + 0.05 * e[1], e[1], e[2], e[3]]).unsqueeze(0)
    keep = distinctive_nms_keep(x, torch.ones(1, 5, dtype=torch.bool), 4)
    assert keep[0].tolist() == [True, False, True, True, True]
    assert torch.equal(keep, greedy_similarity_keep(x, torch.ones(1, 5, dtype=torch.bool), 4))
