"""benchmarks/content_headroom.py: its scorer starts as greedy similarity, and its episodes draw exact-size sets
whose log-probabilities carry the gradient to every scorer weight."""

import pytest
import torch

from benchmarks.content_headroom import (
    ContentScorer,
    greedy_keep_rank,
    sampled_episodes,
    scorer_problem,
    scorer_selector,
)
from envs.errors import UsageError
from envs.vit.pruned_forward import exact_forward_from, initial_state
from policies.heuristics import heuristic_selector
from tests.tiny_policies import write_checkpoint


def _state(staged, seed: int):
    return initial_state(staged, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def test_an_untrained_scorer_is_greedy_similarity(tiny_staged):
    staged, _ = tiny_staged
    state = _state(staged, 0)
    with torch.no_grad():
        learned = exact_forward_from(staged, state, scorer_selector(staged, ContentScorer(staged.embed_dim, 16), 0.5),
                                     0.5, "merge")
        greedy = exact_forward_from(staged, state, heuristic_selector("similarity"), 0.5, "merge")
    torch.testing.assert_close(learned, greedy)
    rank = greedy_keep_rank(state.patches, state.live)
    assert (rank.min(dim=1).values == 0).all() and (rank.max(dim=1).values == 1).all()


def test_cold_draws_are_the_most_likely_sets_and_warm_ones_carry_the_gradient(tiny_staged):
    staged, _ = tiny_staged
    state = _state(staged, 1)
    torch.manual_seed(0)
    scorer = ContentScorer(staged.embed_dim, hidden=16, relational=True)
    torch.nn.init.normal_(scorer.out[-1].weight, std=0.3)
    with torch.no_grad():
        mode = exact_forward_from(staged, state, scorer_selector(staged, scorer, 0.5), 0.5, "merge")
    cold, _ = sampled_episodes(staged, scorer, state, 0.5, temperature=1e-4)
    torch.testing.assert_close(cold, mode)

    warm = [sampled_episodes(staged, scorer, state, 0.5, temperature=1.0) for _ in range(2)]
    assert not torch.allclose(warm[0][0], warm[1][0])  # different sets drawn
    logits, log_prob = warm[0]
    assert not logits.requires_grad and log_prob.shape == (6,) and (log_prob < 0).all()
    log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer.parameters())


def test_a_checkpoint_that_drops_tokens_is_refused_in_one_line(tmp_path, tiny_backbone):
    """The scorer reads merged tokens: a checkpoint that drops them is a usage error (exit code 2), named."""
    checkpoint = write_checkpoint(tmp_path / "policy", tiny_backbone, reduction="drop")
    with pytest.raises(UsageError, match=rf"^content_headroom needs a checkpoint that merges, .*; {checkpoint} drops$"):
        scorer_problem(checkpoint, "content_headroom")
