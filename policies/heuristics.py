"""Baseline token selectors at an exact budget: random, greedy class attention (EViT), greedy similarity.

Each takes the live mask and the budget ``k`` (from ``envs.token_ops.tokens_to_keep``) and returns
``keep_index [B, k]``, long, ascending, live tokens only. :func:`make_selector` adapts them to
``envs.pruned_forward.Selector``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from envs.pruned_forward import Selector
from envs.token_ops import topk_keep_index

HEURISTICS: tuple[str, ...] = ("random", "attention", "similarity")


def random_keep(live: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` live tokens per image, uniformly at random. ``live [B, N]`` -> ``[B, k]``."""
    scores = torch.rand(live.shape, generator=generator, device=live.device)
    return topk_keep_index(scores, live, k)


def greedy_attention_keep(cls_attention: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` live tokens the class token attends to most (EViT). ``[B, N]`` -> ``[B, k]``."""
    return topk_keep_index(cls_attention, live, k)


def greedy_similarity_keep(x_patch: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """Drop the most redundant token first until ``k`` remain.

    Repeatedly removes the remaining live token with the highest max cosine similarity to the other
    remaining tokens, recomputing after each removal. The two tokens of the closest pair always tie on
    that score; the one more similar to all the others (higher summed similarity) goes, so the more
    distinctive one stays. Vectorised over the batch; images with fewer live tokens stop earlier.

    Args:
        x_patch: ``[B, N, D]`` patch tokens.
        live: ``[B, N]`` bool.
        k: tokens to keep per image.

    Returns:
        ``[B, k]`` long.
    """
    num_tokens = live.shape[1]
    unit = F.normalize(x_patch.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    similarity = (similarity + similarity.transpose(1, 2)) / 2  # exactly symmetric: ties are exact
    self_pair = torch.eye(num_tokens, dtype=torch.bool, device=live.device)
    remaining = live.clone()
    for _ in range(int(live.sum(dim=1).max()) - k):
        others = remaining.unsqueeze(1) & ~self_pair  # [B, N, N]
        nearest = similarity.masked_fill(~others, float("-inf")).amax(dim=-1)
        nearest = nearest.masked_fill(~remaining, float("-inf"))  # [B, N]
        closest = nearest == nearest.amax(dim=1, keepdim=True)
        total = (similarity * others).sum(dim=-1).masked_fill(~closest, float("-inf"))
        drop = total.argmax(dim=1)  # [B]
        over_budget = remaining.sum(dim=1) > k
        remaining &= ~(F.one_hot(drop, num_tokens).bool() & over_budget.unsqueeze(1))
    return topk_keep_index(remaining.float(), live, k)  # exactly k remain; also validates k


def make_selector(name: str, generator: torch.Generator | None = None) -> Selector:
    """The heuristic ``name`` (one of :data:`HEURISTICS`) as a ``Selector`` for ``pruned_forward``."""
    if name == "random":
        return lambda ctx: random_keep(ctx.live, ctx.k, generator)
    if name == "attention":
        return lambda ctx: greedy_attention_keep(ctx.cls_attention, ctx.live, ctx.k)
    if name == "similarity":
        return lambda ctx: greedy_similarity_keep(ctx.x_patch, ctx.live, ctx.k)
    raise ValueError(f"unknown heuristic {name!r}; choose from {HEURISTICS}")

