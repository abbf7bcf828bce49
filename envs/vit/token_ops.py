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


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` long: each score's place in its row of ``scores [..., N]``, 0 for the highest. The one
    ranking of the code base: :func:`highest` chooses by it, and the ``attention_rank`` feature
    (``envs.vit.features``) is made of it."""
    return scores.argsort(dim=-1, descending=True).argsort(dim=-1)


def highest(scores: torch.Tensor, count: int | torch.Tensor, live: torch.Tensor | None = None,
            live_count: int | None = None) -> torch.Tensor:
    """The ``count`` highest ``scores`` of each row: every top-k choice of tokens (the heuristics, the warm
    start's targets, the policies' most likely sets), so that "the k highest" means one thing everywhere. It
    ranks (:func:`descending_rank`) rather than calls ``torch.topk``, which takes one ``k`` for all rows: the
    policies' counts differ from row to row (``policies.distribution``, ``policies.warm_start.clone_module``).

    Args:
        scores: ``[..., N]`` float; higher means keep.
        count: tokens to keep per row: an int, or without ``live`` one per row (``[..., 1]``); 0 allowed
            without ``live``.
        live: ``[B, N]`` bool; dead tokens are never chosen, and the int ``count`` must be in ``1 ..`` the
            smallest live count in the batch. Without it, dead tokens must score lowest (the policies give
            them ``policies.token_scorer.DEAD_SCORE``).
        live_count: the live tokens of every image, where the caller knows it (an exact budget's states,
            ``envs.vit.pruned_forward.Selector``): ``count`` is then checked against it without reading the
            live counts back from the device.

    Returns:
        ``keep [..., N]`` bool with ``count`` True per row.
    """
    if live is not None:
        if live_count is not None:
            min_live = live_count
        else:
            min_live = int(live.sum(dim=1).min()) if live.numel() else 0
        if not 1 <= count <= min_live:
            raise ValueError(f"count must be in [1, {min_live}] (smallest live count in the batch), got {count}")
        # Clamp so that a live score of -inf still ranks above the dead tokens' -inf.
        scores = scores.float().clamp_min(torch.finfo(torch.float32).min).masked_fill(~live, float("-inf"))
    return descending_rank(scores) < count


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
