"""The pruned step, and the pruned forward built on it.

One implementation of "decide, reduce, run the next stage" serves everything that prunes: the training
engine (``envs.pruning_engine``, episodes arriving at any stage), evaluation and the warm start.

- :class:`TokenState`: a batch of images between two stages, what a pruning point decides on.
- :func:`prune_step`: apply a keep decision at the pruning point a state waits at (the removed tokens are
  merged or dropped, ``envs.vit.token_merge``), then run the next stage.
- :func:`exact_forward`: every image keeps ``tokens_to_keep(n_live, target_ratio)`` patch tokens at each
  pruning point (a ``Selector`` returns a top-k mask), so batches stay rectangular;
  :func:`exact_forward_from` does the same from a state at any pruning point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from envs.vit.flops import exact_budget_schedule
from envs.vit.staged_vit import StagedViT
from envs.vit.token_merge import reduce_tokens
from envs.vit.token_ops import pack_keep_mask, pad_tokens


class TokenState(NamedTuple):
    """A batch of images between two stages of a :class:`StagedViT`.

    Patch-token rows are packed: each image's live tokens first, in original image order, then dead rows
    up to the widest image of the batch. ``W`` is that width, ``P`` the prefix tokens.
    """

    tokens: torch.Tensor  # [B, P + W, D] prefix tokens, then patch tokens
    live: torch.Tensor  # [B, W] bool
    size: torch.Tensor  # [B, W] float, original patches each token stands for (1 unless merged)
    positions: torch.Tensor  # [B, W] long, each token's index in the original patch grid
    cls_attention: torch.Tensor | None  # [B, W] class-token attention in the last block of `stage`, 0 on dead
    # rows; None after the last stage and where the selector reads none (`attention_score=False`)
    stage: int  # the stage just run; the pruning point the state waits at has the same index

    @property
    def num_prefix(self) -> int:
        """``P``, the prefix tokens (class, distillation, register) before the patch-token rows."""
        return self.tokens.shape[1] - self.live.shape[1]

    @property
    def patches(self) -> torch.Tensor:
        """``[B, W, D]`` patch tokens."""
        return self.tokens[:, self.num_prefix:]

    @property
    def padded(self) -> bool:
        """Whether any row is dead (attention then needs the live mask)."""
        return not bool(self.live.all())

    def rows(self, index: torch.Tensor | Sequence[int], width: int | None = None) -> TokenState:
        """The images at ``index``, cut to the widest of them: ``width`` live tokens, when the caller knows it
        (finding it reads the live counts back, which waits for a GPU)."""
        live = self.live[index]
        if width is None:
            width = int(live.sum(dim=1).max())
        cls_attention = None if self.cls_attention is None else self.cls_attention[index, :width]
        return TokenState(self.tokens[index, :self.num_prefix + width], live[:, :width], self.size[index, :width],
                          self.positions[index, :width], cls_attention, self.stage)


def concat_states(states: Sequence[TokenState]) -> TokenState:
    """One state of all images of ``states`` (at the same pruning point, with their ``cls_attention``), padded
    with dead rows to the widest."""
    if len({state.stage for state in states}) != 1:
        raise ValueError("states to concatenate must wait at the same pruning point")
    width = max(state.live.shape[1] for state in states)
    prefix = states[0].num_prefix
    columns = zip(*((pad_tokens(state.tokens, prefix + width), *(pad_tokens(t, width) for t in state[1:5]))
                    for state in states), strict=True)
    return TokenState(*(torch.cat(column) for column in columns), states[0].stage)


def initial_state(staged: StagedViT, images: torch.Tensor, attention_score: bool = True) -> TokenState:
    """Embed normalised ``images [B, C, H, W]`` and run stage 0: the state at the first pruning point, with
    the class-token attention when ``attention_score``."""
    tokens, cls_attention = staged.forward_stage(staged.embed(images), 0, attention_score=attention_score)
    batch, num_patches, device = len(images), staged.num_patches, tokens.device
    return TokenState(tokens, torch.ones(batch, num_patches, dtype=torch.bool, device=device),
                      torch.ones(batch, num_patches, device=device),
                      torch.arange(num_patches, device=device).expand(batch, num_patches), cls_attention, 0)


def effective_keep(state: TokenState, keep: torch.Tensor) -> torch.Tensor:
    """``keep [B, W]`` restricted to live tokens; an image that keeps none keeps its most class-attended one
    (its first live one without scores), so every image still reaches the head."""
    keep = keep.bool() & state.live
    empty = ~keep.any(dim=1)
    if empty.any():
        score = state.live.float() if state.cls_attention is None else state.cls_attention
        best = score.masked_fill(~state.live, float("-inf")).argmax(dim=1)
        keep = keep | (torch.nn.functional.one_hot(best, keep.shape[1]).bool() & empty.unsqueeze(1))
    return keep


def prune_step(staged: StagedViT, state: TokenState, keep: torch.Tensor, reduction: str,
               attention_score: bool = True, count: int | None = None) -> TokenState:
    """Apply ``keep [B, W]`` (bool, any count per image) at the pruning point ``state`` waits at, then run
    the next stage (with the class-token attention when ``attention_score`` and a pruning point follows it).

    The tokens not kept are merged into the kept ones or dropped (``reduction``, ``envs.vit.token_merge``);
    the survivors are packed first (:func:`envs.vit.token_ops.pack_keep_mask`) and attention is masked only
    when images keep different counts. ``count``: the live tokens every image keeps, where the caller has
    checked it (an exact budget, at least 1): the step then reads nothing back from the device, which on a
    GPU would wait for the work queued before it.
    """
    index, live = pack_keep_mask(effective_keep(state, keep) if count is None else keep, state.live, count)
    tokens, size = reduce_tokens(state.tokens, state.size, state.live, index, live, state.num_prefix, reduction)
    stage = state.stage + 1
    padded = count is None and not bool(live.all())
    tokens, cls_attention = staged.forward_stage(tokens, stage, live if padded else None,
                                                 size if reduction == "merge" else None,
                                                 attention_score=attention_score and stage < len(staged.prune_points))
    return TokenState(tokens, live, size, state.positions.gather(1, index), cls_attention, stage)


def classify(staged: StagedViT, state: TokenState, reduction: str, padded: bool | None = None) -> torch.Tensor:
    """Logits ``[B, num_classes]`` of a state after the last stage. ``padded``: whether any row is dead, where
    the caller knows it (an exact budget: none); otherwise it is read back from the device."""
    padded = state.padded if padded is None else padded
    return staged.classify(state.tokens, state.live if padded else None, state.size if reduction == "merge" else None)


Selector = Callable[[TokenState, int], torch.Tensor]
"""``(state, k)`` -> ``keep [B, W]`` bool with exactly ``k`` live tokens per image (exact budget). Every image of
``state`` has all its ``W`` rows live (:func:`exact_forward_from` starts from such states only and keeps them so),
so a selector knows the live counts on the host and need not read them back from the device."""


def exact_forward(staged: StagedViT, images: torch.Tensor, select: Selector, target_ratio: float,
                  reduction: str, attention_score: bool = True, check_counts: bool = True) -> torch.Tensor:
    """Logits ``[B, num_classes]`` with ``select`` choosing ``tokens_to_keep`` tokens at every pruning point, so
    that the patch tokens alive in each stage are ``envs.vit.flops.exact_budget_schedule``'s for every image.
    ``attention_score=False`` for a selector that reads no class-token attention spares computing it.

    ``check_counts``: check that ``select`` keeps exactly ``k`` live tokens of every image, which reads its
    choice back from the device (a GPU waits for it) at every pruning point; off only for selectors that keep
    ``k`` by construction (``policies.pruned_vit.PrunedViT``'s). The mask's shape is always checked.
    """
    return _exact_forward(staged, initial_state(staged, images, attention_score), select, target_ratio,
                          reduction, attention_score, check_counts)


def exact_forward_from(staged: StagedViT, state: TokenState, select: Selector, target_ratio: float,
                       reduction: str) -> torch.Tensor:
    """:func:`exact_forward` from a state at any pruning point whose images all keep the same tokens' count
    (:func:`initial_state`, or a state an exact budget pruned), so that callers that already ran the stages
    before it (the training engine, search over selectors) do not run them again. The stages it runs compute the
    class-token attention for ``select``, and every selection's count is checked.
    """
    if state.padded:
        raise ValueError("exact_forward_from starts from a state whose images keep the same tokens' count")
    return _exact_forward(staged, state, select, target_ratio, reduction, attention_score=True, check_counts=True)


def _exact_forward(staged: StagedViT, state: TokenState, select: Selector, target_ratio: float, reduction: str,
                   attention_score: bool, check_counts: bool) -> torch.Tensor:
    """:func:`exact_forward_from` from a state the caller knows to be unpadded (:func:`initial_state`'s), which
    reads nothing back from the device beyond what ``select`` and ``check_counts`` do."""
    kept = exact_budget_schedule(state.live.shape[1], len(staged.prune_points) - state.stage, target_ratio)
    for k in kept[1:]:
        keep = select(state, k)
        if keep.shape != state.live.shape or (check_counts and
                                              not bool(((keep & state.live).sum(dim=1) == k).all())):
            raise ValueError(f"a selector must keep exactly {k} live tokens per image "
                             f"(a [B, W] = {tuple(state.live.shape)} bool mask)")
        state = prune_step(staged, state, keep, reduction, attention_score, count=k)
    return classify(staged, state, reduction, padded=False)
