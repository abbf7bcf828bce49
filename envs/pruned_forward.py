"""A full forward of a ``StagedViT`` that drops tokens at every pruning point with any selector.

Exact-budget mode: at each pruning point every image keeps ``tokens_to_keep(n_live, target_ratio)``
patch tokens, so batches stay rectangular. Heuristics (``policies.heuristics``) and learned policies
plug in as a ``Selector``: a function from a :class:`PruneContext` to ``keep_index [B, k]``.

Adaptive mode (:func:`adaptive_forward`): a ``KeepRule`` decides per image which tokens survive, any
number; images are regrouped by kept count after each pruning point so batches stay (nearly) rectangular.

In both, ``reduction`` says what happens to the tokens not kept (``envs.token_merge``): ``merge`` (the
default) averages them into their most similar kept token, ``drop`` discards them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from envs.staged_vit import StagedViT
from envs.token_merge import check_reduction, reduce_tokens
from envs.token_ops import pack_keep_mask, tokens_to_keep


class PruneContext(NamedTuple):
    """What a selector sees at one pruning point."""

    x_patch: torch.Tensor  # [B, N, D] patch tokens after the stage before the point
    cls_attention: torch.Tensor  # [B, N] class-token attention to each patch token, mean over heads
    live: torch.Tensor  # [B, N] bool; all True in exact-budget mode
    positions: torch.Tensor  # [B, N] long, index of each token in the original patch grid
    stage: int  # the stage that produced x_patch = index of this pruning point, 0 .. num_points - 1
    k: int  # patch tokens to keep


Selector = Callable[[PruneContext], torch.Tensor]
"""Returns ``keep_index [B, k]``: long indices into ``x_patch``, ascending, among live tokens."""


def pruned_forward(staged: StagedViT, images: torch.Tensor, select: Selector, target_ratio: float,
                   reduction: str = "merge") -> tuple[torch.Tensor, list[int]]:
    """Logits ``[B, num_classes]`` with ``select`` choosing the kept tokens at every pruning point.

    Returns the logits and the patch tokens alive in each stage (``num_stages`` counts, the first being
    all patches).
    """
    merge = check_reduction(reduction) == "merge"
    prefix = staged.num_prefix_tokens
    x = staged.embed(images)
    batch, num_patches = x.shape[0], x.shape[1] - prefix
    positions = torch.arange(num_patches, device=x.device).expand(batch, num_patches)
    size = torch.ones(batch, num_patches, device=x.device)
    x, cls_attention = staged.forward_stage(x, 0)
    kept = [num_patches]
    for stage in range(staged.num_stages - 1):
        k = tokens_to_keep(kept[-1], target_ratio)
        live = torch.ones_like(positions, dtype=torch.bool)
        keep_index = select(PruneContext(x[:, prefix:], cls_attention, live, positions, stage, k))
        if keep_index.shape != (batch, k):
            raise ValueError(f"selector returned keep_index of shape {tuple(keep_index.shape)}, "
                             f"expected {(batch, k)}")
        x, size = reduce_tokens(x, size, live, keep_index, torch.ones_like(keep_index, dtype=torch.bool),
                                prefix, reduction)
        positions = positions.gather(1, keep_index)
        x, cls_attention = staged.forward_stage(x, stage + 1, None, size if merge else None)
        kept.append(k)
    return staged.classify(x, None, size if merge else None), kept


KeepRule = Callable[[PruneContext], torch.Tensor]
"""Returns ``keep [B, N]`` bool: the tokens each image keeps, any number per image (dead ones ignored)."""


class _Group(NamedTuple):
    """Images of a batch that run a stage together; patch tokens packed first, padded with dead ones."""

    rows: torch.Tensor  # [b] rows of the images in the whole batch
    x: torch.Tensor  # [b, P + w, D]
    cls_attention: torch.Tensor | None  # [b, w], None before the stage has run
    live: torch.Tensor  # [b, w] bool
    positions: torch.Tensor  # [b, w] long
    size: torch.Tensor | None  # [b, w] original patches per token (merge), None when dropping


def adaptive_forward(staged: StagedViT, images: torch.Tensor, decide: KeepRule, max_padding: float = 0.0,
                     reduction: str = "merge") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, num_classes]`` with ``decide`` choosing, per image, which tokens survive each point.

    Images keep different numbers of tokens, so after every pruning point the batch is regrouped into
    sub-batches of equal kept counts (or, with ``max_padding`` > 0, counts within that fraction of the
    sub-batch's largest, padded with masked tokens): compute goes to real tokens, not padding. An image
    whose decision keeps nothing keeps its most class-attended live token, as the training env does.
    ``decide`` sees ``PruneContext.k == 0`` (no budget) and live tokens packed first in image order.

    Returns the logits and ``kept [B, num_stages]`` long: each image's patch tokens alive in each stage.
    """
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    merge = check_reduction(reduction) == "merge"
    x = staged.embed(images)
    batch, num_patches = x.shape[0], x.shape[1] - staged.num_prefix_tokens
    x, cls_attention = staged.forward_stage(x, 0)
    positions = torch.arange(num_patches, device=x.device).expand(batch, num_patches)
    live = torch.ones(batch, num_patches, dtype=torch.bool, device=x.device)
    size = torch.ones(batch, num_patches, device=x.device) if merge else None
    groups = [_Group(torch.arange(batch, device=x.device), x, cls_attention, live, positions, size)]
    kept = torch.full((batch, staged.num_stages), num_patches, dtype=torch.long)
    for stage in range(staged.num_stages - 1):
        survivors = _concat([_survivors(staged, group, decide, stage, reduction) for group in groups])
        kept[survivors.rows.cpu(), stage + 1] = survivors.live.sum(dim=1).cpu()
        groups = [_run_stage(staged, group, stage + 1) for group in _split_by_count(staged, survivors,
                                                                                     max_padding)]
    logits = torch.empty(batch, staged.vit.num_classes, device=x.device, dtype=x.dtype)
    for group in groups:
        logits[group.rows] = staged.classify(group.x, None if group.live.all() else group.live, group.size)
    return logits, kept


def _survivors(staged: StagedViT, group: _Group, decide: KeepRule, stage: int, reduction: str) -> _Group:
    """The tokens of ``group`` that ``decide`` keeps (at least one per image), packed first."""
    prefix = staged.num_prefix_tokens
    ctx = PruneContext(group.x[:, prefix:], group.cls_attention, group.live, group.positions, stage, 0)
    keep = decide(ctx).bool() & group.live
    empty = ~keep.any(dim=1)
    if empty.any():
        best = group.cls_attention.masked_fill(~group.live, float("-inf")).argmax(dim=1)
        keep[empty, best[empty]] = True
    index, live_after = pack_keep_mask(keep, group.live)
    size = torch.ones_like(group.live, dtype=torch.float32) if group.size is None else group.size
    x, size = reduce_tokens(group.x, size, group.live, index, live_after, prefix, reduction)
    return _Group(group.rows, x, None, live_after, group.positions.gather(1, index),
                  None if group.size is None else size)


def _concat(groups: list[_Group]) -> _Group:
    """One group of all images, padded with dead tokens to the widest."""
    width = max(group.live.shape[1] for group in groups)
    parts = [(group.rows, _pad(group.x, width + group.x.shape[1] - group.live.shape[1]),
              _pad(group.live, width), _pad(group.positions, width)) for group in groups]
    rows, x, live, positions = (torch.cat(column) for column in zip(*parts, strict=True))
    size = None if groups[0].size is None else torch.cat([_pad(group.size, width) for group in groups])
    return _Group(rows, x, None, live, positions, size)


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t [b, n, ...]`` zero-padded along dim 1 to ``length``."""
    extra = length - t.shape[1]
    return t if extra == 0 else torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)


def _split_by_count(staged: StagedViT, merged: _Group, max_padding: float) -> list[_Group]:
    """Sub-batches of near-equal kept counts, each cut to its own widest image."""
    counts = merged.live.sum(dim=1)
    order = counts.argsort(descending=True, stable=True)
    sorted_counts = counts[order].tolist()
    groups, start = [], 0
    while start < len(order):
        width = sorted_counts[start]
        stop = start + 1
        while stop < len(order) and sorted_counts[stop] >= width * (1.0 - max_padding):
            stop += 1
        index = order[start:stop]
        groups.append(_Group(merged.rows[index], merged.x[index, :staged.num_prefix_tokens + width], None,
                             merged.live[index, :width], merged.positions[index, :width],
                             None if merged.size is None else merged.size[index, :width]))
        start = stop
    return groups


def _run_stage(staged: StagedViT, group: _Group, stage: int) -> _Group:
    """Run ``stage`` on one sub-batch; the attention mask is skipped when no token is padding."""
    x, cls_attention = staged.forward_stage(group.x, stage, None if group.live.all() else group.live, group.size)
    return _Group(group.rows, x, cls_attention, group.live, group.positions, group.size)
