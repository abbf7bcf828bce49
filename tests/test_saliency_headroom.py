"""benchmarks/saliency_headroom.py: its gradient is that of the answer of the rest of the forward, and its
oracles keep the k tokens that answer depends on most."""

import copy

import torch

from benchmarks.saliency_headroom import SALIENCIES, answer_gradient, saliency_selector
from envs.vit.pruned_forward import exact_forward_from, initial_state, prune_step
from envs.vit.token_ops import highest, tokens_to_keep
from policies.heuristics import heuristic_selector


def _answer_log_prob(staged, state, tokens, answer):
    """The log-probability of ``answer`` when the stages after ``state`` run on ``tokens`` (its shape)."""
    logits = staged.forward_from(tokens, state.stage + 1, state.size)
    return logits.log_softmax(-1).gather(1, answer[:, None]).squeeze(1)


def test_the_gradient_is_that_of_the_answer_of_the_rest_of_the_forward(tiny_staged):
    staged = copy.deepcopy(tiny_staged[0]).double()  # a first-order check needs more digits than float32's
    torch.manual_seed(0)
    with torch.no_grad():
        first = initial_state(staged, torch.randn(4, 3, 32, 32, dtype=torch.float64))
        unpruned = staged.forward_from(first.tokens, 1).argmax(1)
        k = tokens_to_keep(first.live.shape[1], 0.5)
        later = prune_step(staged, first, highest(torch.rand(first.live.shape), k, first.live), "merge",
                           count=k)
    for state, answer in ((first, unpruned), (later, None)):
        gradient = answer_gradient(staged, state, "merge")
        assert gradient.shape == state.patches.shape
        with torch.no_grad():
            if answer is None:  # the answer of the pruned state, every later token kept
                answer = staged.forward_from(state.tokens, state.stage + 1, state.size).argmax(1)
            # a small step along the gradient raises the answer's log-probability by |g|^2 * step, to first order
            step = 1e-4
            moved = state.tokens.clone()
            moved[:, state.tokens.shape[1] - state.live.shape[1]:] += step * gradient
            rise = _answer_log_prob(staged, state, moved, answer) - _answer_log_prob(staged, state, state.tokens,
                                                                                      answer)
        expected = step * gradient.pow(2).sum(dim=(1, 2))
        torch.testing.assert_close(rise, expected, rtol=1e-3, atol=0)


def test_each_oracle_keeps_the_k_tokens_of_highest_saliency_in_an_exact_forward(tiny_staged):
    staged, _ = tiny_staged
    with torch.no_grad():
        state = initial_state(staged, torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    k = tokens_to_keep(state.live.shape[1], 0.5)
    gradient = answer_gradient(staged, state, "merge")
    for saliency in SALIENCIES.values():
        select = saliency_selector(staged, "merge", saliency)
        keep = select(state, k)
        score = saliency(gradient, state.patches)
        assert (keep.sum(dim=1) == k).all()
        assert (score.masked_fill(~keep, float("inf")).amin(dim=1)
                >= score.masked_fill(keep, float("-inf")).amax(dim=1)).all()
        with torch.no_grad():
            oracle = exact_forward_from(staged, state, select, 0.5, "merge")  # checks k at every point
            greedy = exact_forward_from(staged, state, heuristic_selector("similarity"), 0.5, "merge")
        assert not torch.equal(oracle, greedy)
