"""Pure tensor functions on patch tokens: the token budget, top-k keep masks, gathering, packing, padding.

Token layout everywhere: ``x [B, T, D]`` holds the ``P`` prefix tokens (class, distillation, register)
first, then the ``N = T - P`` patch tokens. Only patch tokens are ever removed. Indices into patch tokens
run over ``0 .. N-1``; a ``live`` bool mask ``[B, N]`` marks real tokens in batches padded to a common
length (images that keep different numbers of tokens).
"""

from __future__ import annotations

import torch


def tokens_to_keep(num_live: int, target_ratio: float) -> int:
    """Patch tokens kept at a pruning point: ``max(1, round(num_live * (1 - target_ratio)))``.

    The one definition of the budget, shared by the agents' turns (``policies.decisions``), the exact forward
    that every selection runs (``envs.vit.pruned_forward``) and the GFLOPs count (``envs.vit.flops``).
    ``round`` is Python's (half to even).
    """
    return max(1, round(num_live * (1.0 - target_ratio)))


def gather_tokens(x: torch.Tensor, keep_index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prefix tokens plus the patch tokens at ``keep_index``, in that order.

    Args:
        x: ``[B, P + N, D]`` tokens, prefix first.
        keep_index: ``[B, K]`` long indices into the patch tokens (``0 .. N-1``).
        num_prefix: ``P``.

    Returns:
        ``[B, P + K, D]``.
    """
    patches = x[:, num_prefix:].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix], patches], dim=1)


def topk_keep_mask(scores: torch.Tensor, live: torch.Tensor, k: int, live_count: int | None = None) -> torch.Tensor:
    """The ``k`` highest-scoring live tokens of each image.

    Args:
        scores: ``[B, N]`` float; higher means keep.
        live: ``[B, N]`` bool; dead tokens are never chosen.
        k: tokens to keep per image, ``1 <= k <=`` the smallest live count in the batch.
        live_count: the live tokens of every image, where the caller knows it (an exact budget's states,
            ``envs.vit.pruned_forward.Selector``): ``k`` is then checked against it without reading the live
            counts back from the device.

    Returns:
        ``keep [B, N]`` bool with exactly ``k`` True per image.
    """
    if live_count is not None:
        min_live = live_count
    else:
        min_live = int(live.sum(dim=1).min()) if live.numel() else 0
    if not 1 <= k <= min_live:
        raise ValueError(f"k must be in [1, {min_live}] (smallest live count in the batch), got {k}")
    # Clamp so that a live score of -inf still ranks above the dead tokens' -inf.
    finite = scores.float().clamp_min(torch.finfo(torch.float32).min)
    index = finite.masked_fill(~live, float("-inf")).topk(k, dim=1).indices
    return torch.zeros_like(live).scatter(1, index, True)


def highest(scores: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """``[..., N]`` bool: the ``count`` highest ``scores [..., N]`` of each row, ``count`` an int or one per row
    (``[..., 1]``), 0 allowed. Unlike :func:`topk_keep_mask` it takes no live mask: dead tokens must score
    lowest (the policies give them ``policies.token_scorer.DEAD_SCORE``)."""
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank < count


def pack_keep_mask(keep: torch.Tensor, live: torch.Tensor,
                   count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-image keep decisions of different counts into one padded index for :func:`gather_tokens`.

    Kept live tokens come first, in their original order; rows are padded to the largest kept count,
    padded entries point at token 0 and are marked not live.

    Args:
        keep: ``[B, N]`` bool decisions; ignored where ``live`` is False.
        live: ``[B, N]`` bool.
        count: the kept live tokens of every image, where the caller knows it (an exact budget): ``K_max``
            is then not read back from the device.

    Returns:
        ``index [B, K_max]`` long and ``live_after [B, K_max]`` bool.
    """
    kept = keep & live
    counts = kept.sum(dim=1)
    k_max = count if count is not None else int(counts.max()) if counts.numel() else 0
    order = (~kept).to(torch.uint8).argsort(dim=1, stable=True)[:, :k_max]
    live_after = torch.arange(k_max, device=keep.device) < counts.unsqueeze(1)
    return order.masked_fill(~live_after, 0), live_after


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t [B, n, ...]`` zero-padded (False for bool) along the token axis (dim 1) to ``length >= n``."""
    extra = length - t.shape[1]
    return t if extra == 0 else torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)
