"""Per-token features the two agents observe at a pruning point (docs/DESIGN.md, "Observations").

:func:`observe` is the one feature call: the training engine, evaluation and the warm start all observe a
:class:`~envs.vit.pruned_forward.TokenState` through it, and it is the one place that handles non-finite
values (replaced by 0 and counted). All cheap: the class-token attention row comes from the backbone
(``StagedViT.forward_stage``); the rest needs token norms and one ``[N, N]`` cosine-similarity matrix per
image, never a full attention matrix, and no sequential step, so they stay cheap at 196 tokens. Max and
mean similarity are symmetric: two near-duplicates both score high, though removing one of them makes the
other unique. The two suppression features break the tie in one shot, as non-maximum suppression does
(:func:`suppression`): a token's similarity to the live tokens ranked above it, so of a near-duplicate pair
only the lower-ranked member scores high. ``suppression`` ranks by class attention; ``distinct_suppression``
ranks by distinctiveness (lower mean similarity first), which is what greedy similarity's sequential
removal keeps, so it encodes that heuristic's choice in one shot. Every feature is finite for any number of
live tokens, and 0 on dead rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from envs.vit.pruned_forward import TokenState
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import descending_rank

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
    "suppression",  # max cosine similarity to a more attended live token (0 for the most attended)
    "distinct_suppression",  # max cosine similarity to a more distinctive live token (0 for the most distinctive)
    "norm",
    "row",
    "col",
    "progress",
    "keep_fraction",
)
AGENT_FEATURES: dict[str, tuple[str, ...]] = {"attention": ATTENTION_FEATURES, "similarity": SIMILARITY_FEATURES}

_LOG_EPS = 1e-6


def cosine_similarity(x_patch: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` cosine similarity of the tokens ``x_patch [B, N, D]``, exactly symmetric (exact ties)."""
    unit = F.normalize(x_patch.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    return (similarity + similarity.transpose(1, 2)) / 2


def other_live(live: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool: ``[b, i, j]`` is whether ``j`` is a live token other than ``i``."""
    return live.unsqueeze(1) & ~torch.eye(live.shape[1], dtype=torch.bool, device=live.device)


def max_similarity_to(similarity: torch.Tensor, among: torch.Tensor, empty: float) -> torch.Tensor:
    """``[B, N]``: each token's highest ``similarity [B, N, N]`` to the tokens ``among [B, N, N]`` marks for it
    (``[b, i, j]``: whether ``j`` counts for ``i``); ``empty`` where none does."""
    return torch.where(among.any(dim=-1), similarity.masked_fill(~among, -1.0).amax(dim=-1), empty)


def mean_similarity(similarity: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: each token's mean cosine similarity to the other live tokens (0 if there are none)."""
    others = other_live(live)
    return (similarity * others).sum(dim=-1) / others.sum(dim=-1).clamp_min(1)


def suppression(similarity: torch.Tensor, live: torch.Tensor, priority: torch.Tensor,
                top: float = 0.0) -> torch.Tensor:
    """One-shot non-maximum suppression: each live token's max cosine similarity to a live token of higher
    ``priority``, so of a group of near-duplicates only the highest-priority member scores low.

    Args:
        similarity: ``[B, N, N]`` from :func:`cosine_similarity`.
        live: ``[B, N]`` bool.
        priority: ``[B, N]``; ties suppress neither way.
        top: the score of a token with no live token above it (the highest-priority one).

    Returns:
        ``[B, N]`` float; ``top`` on dead rows too.
    """
    above = other_live(live) & (priority.unsqueeze(1) > priority.unsqueeze(2))  # [b, i, j]: j ranks above i
    return max_similarity_to(similarity, above, top)


def token_features(x_patch: torch.Tensor, cls_attention: torch.Tensor, live: torch.Tensor,
                   positions: torch.Tensor, grid_size: tuple[int, int], stage: int, num_points: int,
                   keep_fraction: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every patch token for the attention agent and the similarity agent.

    Args:
        x_patch: ``[B, N, D]`` patch-token embeddings after the stage before the pruning point.
        cls_attention: ``[B, N]`` class-token attention to each token (``StagedViT.forward_stage``).
        live: ``[B, N]`` bool (an image with no live token gets all-zero features).
        positions: ``[B, N]`` long, each token's index in the original ``grid_size`` patch grid.
        grid_size: ``(rows, cols)`` of the patch grid.
        stage: index of the pruning point (= of the stage that produced ``x_patch``), ``0 .. num_points - 1``.
        num_points: number of pruning points.
        keep_fraction: ``1 - target_ratio``, one for all images or ``[B]``, one per image (a policy trained over
            several budgets learns what each one asks through it).

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
    rank = descending_rank(attention.masked_fill(~live, float("-inf"))).float()  # 0 = most attended
    attention_rank = 1.0 - rank / (n_live - 1).clamp_min(1)

    norm = x.norm(dim=-1) * mask
    norm = norm / (norm.sum(dim=1, keepdim=True) / n_live.clamp_min(1)).clamp_min(1e-12)

    similarity = cosine_similarity(x)  # [B, N, N]
    max_similarity = max_similarity_to(similarity, other_live(live), 0.0)
    mean = mean_similarity(similarity, live)
    suppressed_by_attention = suppression(similarity, live, attention)
    suppressed_by_distinct = suppression(similarity, live, -mean)

    rows, cols = grid_size
    row = torch.div(positions, cols, rounding_mode="floor").float() / max(rows - 1, 1)
    col = (positions % cols).float() / max(cols - 1, 1)
    progress = torch.full_like(mask, stage / max(num_points - 1, 1))
    # A Python number fills the tensor on the device; as_tensor would copy it there from the host.
    keep = (torch.full_like(mask, keep_fraction) if isinstance(keep_fraction, float | int) else
            keep_fraction.to(mask).reshape(-1, 1).expand_as(mask))

    shared = [norm, row, col, progress, keep]
    attention_features = torch.stack(
        [attention, attention.clamp_min(_LOG_EPS).log(), attention_rank, *shared], dim=-1)
    similarity_features = torch.stack([max_similarity, mean, suppressed_by_attention,
                                       suppressed_by_distinct, *shared], dim=-1)
    return attention_features * mask.unsqueeze(-1), similarity_features * mask.unsqueeze(-1)


class Observation(NamedTuple):
    """What the two agents see at one pruning point, row ``i`` being the state's ``i``-th token row."""

    attention: torch.Tensor  # [B, W, len(ATTENTION_FEATURES)] float32, zeros on dead rows
    similarity: torch.Tensor  # [B, W, len(SIMILARITY_FEATURES)] float32, zeros on dead rows
    live: torch.Tensor  # [B, W] bool
    nonfinite: torch.Tensor  # [] long, feature values that were NaN or infinite and were replaced by 0, on the
    # device (whoever reports it reads it back; the exact-budget forward does not)


def observe(staged: StagedViT, state: TokenState, target_ratio: float | torch.Tensor) -> Observation:
    """Both agents' features for the tokens of ``state`` at the pruning point it waits at, under the removal
    ratio ``target_ratio`` (one for all images, or ``[B]``, one per image).

    Non-finite values (a degenerate backbone or input) are replaced by 0 and counted here, so nothing
    downstream needs to guard against them. They are replaced whether or not there are any (finite values
    stay as they are), so that nothing is read back from the device to decide.
    """
    attention, similarity = token_features(state.patches, state.cls_attention, state.live, state.positions,
                                           staged.grid_size, state.stage, len(staged.prune_points),
                                           1.0 - target_ratio)
    nonfinite = (~attention.isfinite()).sum() + (~similarity.isfinite()).sum()
    return Observation(attention.nan_to_num(0, 0, 0), similarity.nan_to_num(0, 0, 0), state.live, nonfinite)
