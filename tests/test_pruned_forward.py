"""The pruned step and what is built on it: the training engine and the exact-budget forward give identical
logits for the same decisions; padding images of different counts into one step changes nothing; state
bookkeeping is right."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from envs.pruning_engine import PruningEngine
from envs.vit.features import observe
from envs.vit.flops import exact_budget_schedule
from envs.vit.pruned_forward import (
    TokenState,
    concat_states,
    effective_keep,
    exact_forward,
    exact_forward_from,
    initial_state,
    prune_step,
)
from envs.vit.staged_vit import StagedViT
from envs.vit.token_merge import REDUCTIONS
from envs.vit.token_ops import highest, tokens_to_keep
from tests.conftest import TINY_KWARGS

CONFIG = {"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def staged() -> StagedViT:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", reg_tokens=1, num_classes=10, **TINY_KWARGS).eval()
    return StagedViT(vit, (1, 2, 3))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def normalized(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - 0.5) / 0.25


def top_half_by_attention(state: TokenState, k: int | None = None) -> torch.Tensor:
    """A deterministic decision: the top half of each image's live tokens by class attention."""
    counts = state.live.sum(dim=1).tolist()
    return torch.stack([highest(state.cls_attention[b:b + 1], k or max(1, round(n / 2)), state.live[b:b + 1])[0]
                        for b, n in enumerate(counts)])


def above_mean_attention(state: TokenState) -> torch.Tensor:
    """A decision whose kept counts differ from image to image."""
    attention = state.cls_attention.masked_fill(~state.live, 0)
    return attention > attention.sum(1, keepdim=True) / state.live.sum(1, keepdim=True)


def engine_episodes(staged: StagedViT, images: torch.Tensor, decide, reduction: str) -> list[dict]:
    """Run every image as a training episode, deciding on the state the engine's observations describe."""
    engine = PruningEngine(staged, CONFIG, images, torch.zeros(len(images), dtype=torch.long), 0.5, reduction)
    keys = [str(i) for i in range(len(images))]
    engine.reset(keys, list(range(len(images))))
    while True:
        states = [engine.episodes[key].state for key in keys]
        keep = [decide(state)[0].numpy() for state in states]
        results = engine.step(keys, [np.pad(mask, (0, staged.num_patches - len(mask))) for mask in keep])
        if results[0]["done"]:
            return results


@pytest.mark.parametrize("reduction", ["merge", "drop"])
def test_engine_and_exact_forward_agree_on_the_same_decisions(staged, images, reduction):
    """The one regression test for the seam between training and evaluation: same decisions, same logits."""
    with torch.no_grad():
        exact = exact_forward(staged, normalized(images), top_half_by_attention, 0.5, reduction)
        episodes = engine_episodes(staged, images, top_half_by_attention, reduction)
    schedule = exact_budget_schedule(staged.num_patches, len(staged.prune_points), 0.5)
    assert schedule == [64, 32, 16, 8]
    probs = exact.float().softmax(-1)
    assert [episode["prediction"] for episode in episodes] == exact.argmax(1).tolist()
    assert [episode["kept_per_stage"] for episode in episodes] == [schedule[1:]] * len(images)
    engine_probs = [episode["prob_unpruned_class"] for episode in episodes]
    unpruned = staged(normalized(images)).argmax(1)
    torch.testing.assert_close(torch.tensor(engine_probs), probs[torch.arange(len(images)), unpruned],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["merge", "drop"])
def test_engine_images_of_different_counts_are_as_if_alone(staged, images, reduction):
    """Padding images that keep different counts into one engine step changes nothing: an image pruned in a
    batch gets the prediction and probabilities it gets alone."""
    with torch.no_grad():
        together = engine_episodes(staged, images, above_mean_attention, reduction)
        alone = [engine_episodes(staged, images[i:i + 1], above_mean_attention, reduction)[0]
                 for i in range(len(images))]
    assert len({episode["kept"] for episode in together}) > 1
    for key in ("kept_per_stage", "prediction"):
        assert [episode[key] for episode in together] == [episode[key] for episode in alone]
    torch.testing.assert_close(torch.tensor([episode["prob_unpruned_class"] for episode in together]),
                               torch.tensor([episode["prob_unpruned_class"] for episode in alone]),
                               atol=1e-5, rtol=1e-5)


def test_keep_all_is_the_unpruned_model_and_keep_none_keeps_one(staged, images):
    with torch.no_grad():
        episodes = engine_episodes(staged, images[:3], lambda state: state.live, "merge")
        unpruned = staged.vit(normalized(images[:3])).argmax(1)
        assert [episode["prediction"] for episode in episodes] == unpruned.tolist()
        assert [episode["kept_per_stage"] for episode in episodes] == [[64] * 3] * 3
        episodes = engine_episodes(staged, images[:3], lambda state: torch.zeros_like(state.live), "merge")
    assert [episode["kept_per_stage"] for episode in episodes] == [[1, 1, 1]] * 3  # at least one token survives


def test_effective_keep_restricts_to_live_and_keeps_the_most_attended():
    live = torch.tensor([[True, True, True, False], [True, True, False, False]])
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.3, 0.2, 0.0, 0.0]])
    state = TokenState(torch.zeros(2, 5, 3), live, torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.long),
                       attention, 0)
    keep = torch.tensor([[False, False, False, True], [True, False, True, True]])
    assert effective_keep(state, keep).tolist() == [[False, True, False, False], [True, False, False, False]]


def test_states_cut_and_concatenate(staged, images):
    with torch.no_grad():
        state = initial_state(staged, normalized(images[:3]))
        pruned = prune_step(staged, state, above_mean_attention(state), "merge")
    counts = pruned.live.sum(1).tolist()
    assert len(set(counts)) > 1 and pruned.stage == 1 and pruned.padded
    rows = [pruned.rows([b]) for b in range(3)]
    assert [row.live.shape[1] for row in rows] == counts and not any(row.padded for row in rows)
    assert [row.tokens.shape[1] for row in rows] == [2 + n for n in counts]  # class + register token
    again = concat_states(rows)  # dead rows are zeros again; live rows and the prefix are the same
    assert torch.equal(again.live, pruned.live) and torch.equal(again.tokens[:, :2], pruned.tokens[:, :2])
    for a, b in zip((again.patches, *again[2:5]), (pruned.patches, *pruned[2:5]), strict=True):
        assert torch.equal(a[pruned.live], b[pruned.live])
    with pytest.raises(ValueError, match="same pruning point"):
        concat_states([state, pruned])


def test_merged_sizes_and_positions_track_the_original_patches(staged, images):
    with torch.no_grad():
        state = initial_state(staged, normalized(images[:2]))
        for _ in staged.prune_points:
            state = prune_step(staged, state, top_half_by_attention(state), "merge")
    assert state.size.sum(1).tolist() == [64.0, 64.0]  # every original patch is in some merged token
    assert (state.positions.diff(dim=1) > 0).all()  # kept tokens stay in image order


def test_observe_replaces_and_counts_non_finite_features(staged, images):
    with torch.no_grad():
        state = initial_state(staged, normalized(images[:2]))
    broken = state._replace(cls_attention=state.cls_attention.clone().index_fill(1, torch.tensor([3]), float("nan")))
    observation = observe(staged, broken, 0.5)
    assert observation.nonfinite > 0
    assert observation.attention.isfinite().all() and observation.similarity.isfinite().all()
    assert observe(staged, state, 0.5).nonfinite == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exact_budget_is_tokens_to_keep(staged, images, reduction):
    """The counts reported are the tokens the blocks of each stage ran on (counted at the blocks' inputs)."""
    expected = [64]
    for _ in range(3):
        expected.append(tokens_to_keep(expected[-1], 0.3))
    tokens_in = []
    hooks = [block.norm1.register_forward_pre_hook(lambda module, args: tokens_in.append(args[0].shape[1]))
             for block in staged.vit.blocks]
    try:
        with torch.no_grad():
            exact_forward(staged, normalized(images[:2]), top_half_by_attention, 0.3, reduction)
    finally:
        for hook in hooks:
            hook.remove()
    assert exact_budget_schedule(staged.num_patches, len(staged.prune_points), 0.3) == expected
    assert tokens_in == [staged.vit.num_prefix_tokens + n for n in expected]  # one block per stage here


def test_exact_forward_from_a_cached_stage_is_exact_forward(staged, images):
    inputs = normalized(images)
    asked: list[int] = []

    def counted(state: TokenState, k: int) -> torch.Tensor:
        asked.append(k)
        return top_half_by_attention(state, k)

    with torch.no_grad():
        state = initial_state(staged, inputs)
        logits = exact_forward(staged, inputs[[1, 4]], counted, 0.5, "merge")
        logits_from = exact_forward_from(staged, state.rows([1, 4]), counted, 0.5, "merge")
        pruned = prune_step(staged, state.rows([1, 4]), top_half_by_attention(state.rows([1, 4]), 32), "merge")
        logits_later = exact_forward_from(staged, pruned, counted, 0.5, "merge")
        uneven = prune_step(staged, state, above_mean_attention(state), "merge")
    torch.testing.assert_close(logits_from, logits)
    torch.testing.assert_close(logits_later, logits)  # from the second pruning point, after the same first choice
    assert asked == [32, 16, 8] + [32, 16, 8] + [16, 8]  # the counts kept at each pruning point from there on
    with pytest.raises(ValueError, match="same tokens' count"):
        exact_forward_from(staged, uneven, top_half_by_attention, 0.5, "merge")
