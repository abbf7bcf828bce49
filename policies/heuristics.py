"""Baseline token selectors at an exact budget: random, greedy class attention (EViT), greedy similarity,
attention NMS (non-maximum suppression of near-duplicates by class attention) and distinctive NMS (the same
by distinctiveness: a one-shot version of greedy similarity).

Each takes the live mask and the budget ``k`` (``envs.vit.token_ops.tokens_to_keep``) and returns
``keep [B, N]`` bool with exactly ``k`` live tokens per image; ``live_count``, where the caller knows it, is
the live tokens of every image (``envs.vit.token_ops.highest``), so that nothing is read back from the
device (on a GPU, a wait for it). :data:`HEURISTIC_RULES` defines each heuristic once (its keep rule, what it
computes for ``envs.vit.flops.feature_gflops``, its row name); :func:`heuristic_selector` adapts them to
``envs.vit.pruned_forward.Selector``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from envs.errors import UsageError
from envs.vit.features import cosine_similarity, mean_similarity, other_live, suppression
from envs.vit.flops import TokenScores
from envs.vit.pruned_forward import Selector, TokenState
from envs.vit.token_ops import highest


def random_keep(live: torch.Tensor, k: int, generator: torch.Generator | None = None,
                live_count: int | None = None) -> torch.Tensor:
    """``k`` live tokens per image, uniformly at random. ``live [B, N]`` -> ``[B, N]``."""
    scores = torch.rand(live.shape, generator=generator, device=live.device)
    return highest(scores, k, live, live_count)


def greedy_attention_keep(cls_attention: torch.Tensor, live: torch.Tensor, k: int,
                          live_count: int | None = None) -> torch.Tensor:
    """The ``k`` live tokens the class token attends to most (EViT). ``[B, N]`` -> ``[B, N]``."""
    return highest(cls_attention, k, live, live_count)


def greedy_removal_order(similarity: torch.Tensor, live: torch.Tensor, keep: torch.Tensor,
                         steps: int | None = None) -> torch.Tensor:
    """The step at which greedy similarity removal takes each live token away, until ``keep`` remain.

    Each step removes the remaining live token with the highest max cosine similarity to the other
    remaining tokens. The two tokens of the closest pair always tie on that score; the one more similar to
    all the others (higher summed similarity) goes, so the more distinctive one stays. Vectorised over the
    batch; images stop at their own budget.

    Args:
        similarity: ``[B, N, N]`` from :func:`cosine_similarity`.
        live: ``[B, N]`` bool.
        keep: ``[B]`` long, tokens left per image when the removal stops.
        steps: removals of the image that removes most, where the caller knows it (an exact budget);
            otherwise read back from the device.

    Returns:
        ``[B, N]`` float: ``0, 1, ...`` in removal order; ``inf`` for the tokens that remain, ``-1`` on dead
        tokens.
    """
    num_tokens = live.shape[1]
    remaining = live.clone()
    order = torch.full(live.shape, float("inf"), device=live.device).masked_fill(~live, -1.0)
    if steps is None:
        steps = int((live.sum(dim=1) - keep).max().clamp_min(0)) if live.numel() else 0
    token = torch.arange(num_tokens, device=live.device)
    for step in range(steps):
        others = other_live(remaining)  # [B, N, N]
        nearest = similarity.masked_fill(~others, float("-inf")).amax(dim=-1)
        nearest = nearest.masked_fill(~remaining, float("-inf"))  # [B, N]
        closest = nearest == nearest.amax(dim=1, keepdim=True)
        total = (similarity * others).sum(dim=-1).masked_fill(~closest, float("-inf"))
        over_budget = remaining.sum(dim=1) > keep
        # One-hot by comparison: torch's one_hot checks its input's range, reading it back, off CUDA.
        removed = (token == total.argmax(dim=1, keepdim=True)) & over_budget.unsqueeze(1)
        order = order.masked_fill(removed, float(step))
        remaining &= ~removed
    return order


def greedy_similarity_keep(x_patch: torch.Tensor, live: torch.Tensor, k: int,
                           live_count: int | None = None) -> torch.Tensor:
    """Drop the most redundant token first, recomputing after each removal, until ``k`` remain
    (:func:`greedy_removal_order`). ``x_patch [B, N, D]``, ``live [B, N]`` -> ``[B, N]``."""
    keep = torch.full(live.shape[:1], k, dtype=torch.long, device=live.device)
    steps = None if live_count is None else live_count - k
    order = greedy_removal_order(cosine_similarity(x_patch), live, keep, steps)
    return highest(order, k, live, live_count)  # exactly the k survivors (order inf); also validates k


def nms_redundancy(similarity: torch.Tensor, live: torch.Tensor, rank_by: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: how redundant the two NMS heuristics find each live token: its similarity to a live token
    ranked above it by ``rank_by`` (``envs.vit.features.suppression``; -1 for the top one). They keep the
    lowest."""
    return suppression(similarity, live, rank_by, top=-1.0)


def attention_nms_redundancy(x_patch: torch.Tensor, cls_attention: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: attention NMS's :func:`nms_redundancy`, each token's similarity to a token the class token
    attends to more. ``x_patch [B, N, D]``, ``cls_attention`` and ``live [B, N]``."""
    return nms_redundancy(cosine_similarity(x_patch), live, cls_attention)


def distinctive_nms_redundancy(x_patch: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: Distinctive NMS's :func:`nms_redundancy`, each token's similarity to a more distinctive token
    (lower mean cosine similarity to the others). ``x_patch [B, N, D]``, ``live [B, N]``."""
    similarity = cosine_similarity(x_patch)
    return nms_redundancy(similarity, live, -mean_similarity(similarity, live))


def attention_nms_keep(x_patch: torch.Tensor, cls_attention: torch.Tensor, live: torch.Tensor,
                       k: int, live_count: int | None = None) -> torch.Tensor:
    """Keep the ``k`` live tokens least similar to a token the class token attends to more: non-maximum
    suppression in one shot, so of each group of near-duplicates the most attended one stays (the
    ``suppression`` feature of ``envs.vit.features``). ``x_patch [B, N, D]``, ``[B, N]`` -> ``[B, N]``."""
    return highest(-attention_nms_redundancy(x_patch, cls_attention, live), k, live, live_count)


def distinctive_nms_keep(x_patch: torch.Tensor, live: torch.Tensor, k: int,
                         live_count: int | None = None) -> torch.Tensor:
    """Keep the ``k`` live tokens least similar to a more distinctive token: of each group of near-duplicates
    the most distinctive one stays, as in greedy similarity's sequential removal, but in one shot (the
    ``distinct_suppression`` feature of ``envs.vit.features``). ``x_patch [B, N, D]``, ``live [B, N]`` ->
    ``[B, N]``."""
    return highest(-distinctive_nms_redundancy(x_patch, live), k, live, live_count)


def complete_removal_order(x_patch: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: greedy similarity's removal step of each live token of ``x_patch [B, N, D]`` when it removes
    all but one (:func:`greedy_removal_order`; ``inf`` for the one left, ``-1`` on dead tokens)."""
    one_left = torch.ones(len(live), dtype=torch.long, device=live.device)
    return greedy_removal_order(cosine_similarity(x_patch), live, one_left)


class Heuristic(NamedTuple):
    """One heuristic: its row in evaluate.py's table, what it computes (``envs.vit.flops.TokenScores``), the
    ``k`` tokens it keeps of a state (with the random one's generator), and, for the similarity heuristics, how
    early it removes each live token (:func:`redundancy`)."""

    label: str
    scores: TokenScores
    keep: Callable[[TokenState, int, torch.Generator | None], torch.Tensor]
    redundancy: Callable[[TokenState], torch.Tensor] | None = None


HEURISTIC_RULES: dict[str, Heuristic] = {  # every selector's state is live throughout: its width is the count
    "random": Heuristic("Random", "none", lambda state, k, generator: random_keep(
        state.live, k, generator, state.live.shape[1])),
    "attention": Heuristic("Greedy attention", "attention", lambda state, k, _: greedy_attention_keep(
        state.cls_attention, state.live, k, state.live.shape[1])),
    "similarity": Heuristic("Greedy similarity", "similarity", lambda state, k, _: greedy_similarity_keep(
        state.patches, state.live, k, state.live.shape[1]),
        lambda state: -complete_removal_order(state.patches, state.live)),
    "nms": Heuristic("Attention NMS", "agents", lambda state, k, _: attention_nms_keep(
        state.patches, state.cls_attention, state.live, k, state.live.shape[1]),
        lambda state: attention_nms_redundancy(state.patches, state.cls_attention, state.live)),
    "distinct": Heuristic("Distinctive NMS", "similarity", lambda state, k, _: distinctive_nms_keep(
        state.patches, state.live, k, state.live.shape[1]),
        lambda state: distinctive_nms_redundancy(state.patches, state.live)),
}
"""The heuristics by name: the one place each is defined."""
HEURISTICS: tuple[str, ...] = tuple(HEURISTIC_RULES)
SIMILARITY_HEURISTICS: tuple[str, ...] = tuple(name for name, rule in HEURISTIC_RULES.items() if rule.redundancy)
"""The heuristics that rank tokens by redundancy: those the warm start's similarity agent may imitate."""


def redundancy(name: str, state: TokenState) -> torch.Tensor:
    """``[B, N]``: how early the similarity heuristic ``name`` (one of :data:`SIMILARITY_HEURISTICS`) removes
    each live token, as a score (the highest go first); the same order as its keep set, continued to every
    token, so that it also ranks a subset of the live tokens (the warm start's similarity agent removes from
    those the attention agent did not keep, ``policies.warm_start``)."""
    rule = HEURISTIC_RULES.get(name)
    if rule is None or rule.redundancy is None:
        raise UsageError(f"{name!r} is not a similarity heuristic; choose from {', '.join(SIMILARITY_HEURISTICS)}")
    return rule.redundancy(state)


def heuristic_selector(name: str, generator: torch.Generator | None = None) -> Selector:
    """The heuristic ``name`` (one of :data:`HEURISTICS`) as a ``Selector`` for ``exact_forward``."""
    rule = HEURISTIC_RULES.get(name)
    if rule is None:
        raise UsageError(f"unknown heuristic {name!r}; choose from {HEURISTICS}")
    return lambda state, k: rule.keep(state, k, generator)
