"""Per-token features the two agents observe at a pruning point (docs/DESIGN.md, "Observations").

All cheap: the class-token attention row comes from the backbone (``StagedViT.forward_stage``); the rest
needs token norms and one ``[N, N]`` cosine-similarity matrix per image, never a full attention matrix.
Max and mean similarity are static: two near-duplicates both score high, though removing one of them
makes the other unique. ``redundancy`` adds that context: the order in which removing the most redundant
token first, recomputing after each removal, would take the tokens away down to the budget.
Every feature is finite for any number of live tokens, and 0 on dead rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_FEATURES: tuple[str, ...] = (
    "attention",  # class-token attention, renormalised over live tokens and scaled so uniform = 1
    "log_attention",
    "attention_rank",  # 1 for the most attended live token, 0 for the least
    "norm",  # token L2 norm / mean over live tokens
    "row",  # grid row in [0, 1]
    "col",  # grid column in [0, 1]
    "progress",  # stage / (num_points - 1), in [0, 1]
    "keep_fraction",  # 1 - target_ratio
)
SIMILARITY_FEATURES: tuple[str, ...] = (
    "max_similarity",  # max cosine similarity to the other live tokens (0 if there are none)
    "mean_similarity",  # mean cosine similarity to the other live tokens (0 if there are none)
    "redundancy",  # greedy removal to the budget (greedy_removal_order): 1 = removed first, 0 = survives
    "norm",
    "row",
    "col",
    "progress",
    "keep_fraction",
)

_LOG_EPS = 1e-6


def cosine_similarity(x_patch: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` cosine similarity of the tokens ``x_patch [B, N, D]``, exactly symmetric (exact ties)."""
    unit = F.normalize(x_patch.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    return (similarity + similarity.transpose(1, 2)) / 2


def greedy_removal_order(similarity: torch.Tensor, live: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The step at which greedy similarity removal takes each live token away, until ``keep`` remain.

    Each step removes the remaining live token with the highest max cosine similarity to the other
    remaining tokens. The two tokens of the closest pair always tie on that score; the one more similar to
    all the others (higher summed similarity) goes, so the more distinctive one stays. Vectorised over the
    batch; images stop at their own budget.

    Args:
        similarity: ``[B, N, N]`` from :func:`cosine_similarity`.
        live: ``[B, N]`` bool.
        keep: ``[B]`` long, tokens left per image when the removal stops.

    Returns:
        ``[B, N]`` float: ``0, 1, ...`` in removal order; ``inf`` for the tokens that remain, ``-1`` on dead
        tokens.
    """
    num_tokens = live.shape[1]
    self_pair = torch.eye(num_tokens, dtype=torch.bool, device=live.device)
    remaining = live.clone()
    order = torch.full(live.shape, float("inf"), device=live.device).masked_fill(~live, -1.0)
    steps = int((live.sum(dim=1) - keep).max().clamp_min(0)) if live.numel() else 0
    for step in range(steps):
        others = remaining.unsqueeze(1) & ~self_pair  # [B, N, N]
        nearest = similarity.masked_fill(~others, float("-inf")).amax(dim=-1)
        nearest = nearest.masked_fill(~remaining, float("-inf"))  # [B, N]
        closest = nearest == nearest.amax(dim=1, keepdim=True)
        total = (similarity * others).sum(dim=-1).masked_fill(~closest, float("-inf"))
        over_budget = remaining.sum(dim=1) > keep
        removed = F.one_hot(total.argmax(dim=1), num_tokens).bool() & over_budget.unsqueeze(1)
        order = order.masked_fill(removed, float(step))
        remaining &= ~removed
    return order


def token_features(x_patch: torch.Tensor, cls_attention: torch.Tensor, live: torch.Tensor,
                   positions: torch.Tensor, grid_size: tuple[int, int], stage: int, num_points: int,
                   keep_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every patch token for the attention agent and the similarity agent.

    Args:
        x_patch: ``[B, N, D]`` patch-token embeddings after the stage before the pruning point.
        cls_attention: ``[B, N]`` class-token attention to each token (``StagedViT.forward_stage``).
        live: ``[B, N]`` bool (an image with no live token gets all-zero features).
        positions: ``[B, N]`` long, each token's index in the original ``grid_size`` patch grid.
        grid_size: ``(rows, cols)`` of the patch grid.
        stage: index of the pruning point (= of the stage that produced ``x_patch``), ``0 .. num_points - 1``.
        num_points: number of pruning points.
        keep_fraction: ``1 - target_ratio``.

    Returns:
        ``attention [B, N, len(ATTENTION_FEATURES)]`` and ``similarity [B, N, len(SIMILARITY_FEATURES)]``,
        float32, zeros on dead rows.
    """
    if not 0 <= stage < num_points:
        raise ValueError(f"stage must be in [0, {num_points - 1}], got {stage}")
    x = x_patch.float()
    mask = live.float()
    n_live = mask.sum(dim=1, keepdim=True)  # [B, 1]

    attention = cls_attention.float() * mask
    attention = attention / attention.sum(dim=1, keepdim=True).clamp_min(1e-12) * n_live
    order = attention.masked_fill(~live, float("-inf")).argsort(dim=1, descending=True)
    rank = order.argsort(dim=1).float()  # 0 = most attended
    attention_rank = 1.0 - rank / (n_live - 1).clamp_min(1)

    norm = x.norm(dim=-1) * mask
    norm = norm / (norm.sum(dim=1, keepdim=True) / n_live.clamp_min(1)).clamp_min(1e-12)

    similarity = cosine_similarity(x)  # [B, N, N]
    others = live.unsqueeze(1) & ~torch.eye(live.shape[1], dtype=torch.bool, device=live.device)
    n_others = others.sum(dim=-1)  # [B, N]
    max_similarity = torch.where(n_others > 0, similarity.masked_fill(~others, -1.0).amax(dim=-1), 0.0)
    mean_similarity = (similarity * others).sum(dim=-1) / n_others.clamp_min(1)
    budget = (n_live * keep_fraction).round().clamp_min(1)  # envs.token_ops.tokens_to_keep, per image
    order = greedy_removal_order(similarity, live, budget.squeeze(1).long())
    n_removed = (n_live - budget).clamp_min(1)
    redundancy = torch.where(order.isfinite() & live, (n_removed - order) / n_removed, 0.0)

    rows, cols = grid_size
    row = torch.div(positions, cols, rounding_mode="floor").float() / max(rows - 1, 1)
    col = (positions % cols).float() / max(cols - 1, 1)
    progress = torch.full_like(mask, stage / max(num_points - 1, 1))
    keep = torch.full_like(mask, keep_fraction)

    shared = [norm, row, col, progress, keep]
    attention_features = torch.stack(
        [attention, attention.clamp_min(_LOG_EPS).log(), attention_rank, *shared], dim=-1)
    similarity_features = torch.stack([max_similarity, mean_similarity, redundancy, *shared], dim=-1)
    return attention_features * mask.unsqueeze(-1), similarity_features * mask.unsqueeze(-1)
