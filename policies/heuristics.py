"""Baseline token selectors at an exact budget: random, greedy class attention (EViT), greedy similarity.

Each takes the live mask and the budget ``k`` (from ``envs.token_ops.tokens_to_keep``) and returns
``keep_index [B, k]``, long, ascending, live tokens only. :func:`make_selector` adapts them to
``envs.pruned_forward.Selector``.
"""

from __future__ import annotations

import torch

from envs.features import cosine_similarity, greedy_removal_order
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
    """Drop the most redundant token first, recomputing after each removal, until ``k`` remain
    (``envs.features.greedy_removal_order``). ``x_patch [B, N, D]``, ``live [B, N]`` -> ``[B, k]``."""
    keep = torch.full(live.shape[:1], k, dtype=torch.long, device=live.device)
    order = greedy_removal_order(cosine_similarity(x_patch), live, keep)
    return topk_keep_index(order, live, k)  # exactly k remain; also validates k


def make_selector(name: str, generator: torch.Generator | None = None) -> Selector:
    """The heuristic ``name`` (one of :data:`HEURISTICS`) as a ``Selector`` for ``pruned_forward``."""
    if name == "random":
        return lambda ctx: random_keep(ctx.live, ctx.k, generator)
    if name == "attention":
        return lambda ctx: greedy_attention_keep(ctx.cls_attention, ctx.live, ctx.k)
    if name == "similarity":
        return lambda ctx: greedy_similarity_keep(ctx.x_patch, ctx.live, ctx.k)
    raise ValueError(f"unknown heuristic {name!r}; choose from {HEURISTICS}")

