"""A timm VisionTransformer run stage by stage, so tokens can be dropped between stages.

``StagedViT`` reuses the wrapped model's modules (no weight copies). Its block forward mirrors timm's
``Block``/``Attention`` and adds what pruning needs: an additive key bias that masks padded (dead) patch
tokens and gives merged tokens attention in proportion to their size (ToMe's proportional attention,
``envs.vit.token_merge``), and, when asked (``attention_score``), the class token's attention to each patch token
in the last block of a stage: from the class token's query row alone (``q_cls @ K^T``) with a class token, from
the full attention matrix without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise
from numbers import Integral

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from envs.errors import UsageError


def cls_attention_row(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None,
                      num_prefix: int) -> torch.Tensor:
    """Class token's (token 0) attention to each patch token, averaged over heads (EViT's score).

    Args:
        q, k: ``[B, H, T, head_dim]`` queries and keys after q/k norm.
        key_bias: ``[B, 1, 1, T]`` additive bias (``-inf`` on padded keys, ``log(size)``), or None.
        num_prefix: prefix tokens ``P``; the class token is token 0.

    Returns:
        ``[B, T - P]``; 0 on padded tokens.
    """
    scores = (q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, 1, T]
    if key_bias is not None:
        scores = scores + key_bias
    return scores.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]


def mean_attention_received(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None,
                            num_prefix: int) -> torch.Tensor:
    """Attention each patch token receives, averaged over live queries and heads.

    The stand-in for :func:`cls_attention_row` in models without a class token; it needs the full
    ``[B, H, T, T]`` attention matrix. Shapes as in :func:`cls_attention_row`.
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, T, T]
    if key_bias is None:
        return attn.softmax(dim=-1).mean(dim=(1, 2))[:, num_prefix:]
    attn = (attn + key_bias).softmax(dim=-1)
    query_live = key_bias.isfinite().transpose(-2, -1).to(attn.dtype)  # [B, 1, T, 1]
    received = (attn * query_live).sum(dim=2) / query_live.sum(dim=2)  # [B, H, T]
    return received.mean(dim=1)[:, num_prefix:]


def attention(attn: Attention, x: torch.Tensor, key_bias: torch.Tensor | None,
               training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` with an additive key bias; also returns ``q``, ``k`` for the scores.

    The bias is cast to the queries' dtype (bfloat16 under autocast), which the fused GPU attention kernels
    require of a float mask."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if key_bias is None else key_bias.to(q.dtype),
        dropout_p=attn.attn_drop.p if training else 0.0)
    out = attn.norm(out.transpose(1, 2).flatten(2))
    return attn.proj_drop(attn.proj(out)), q, k


def attention_residual(block: Block, x: torch.Tensor, key_bias: torch.Tensor | None,
                       training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of timm ``Block.forward``: tokens ``x [B, T, D]`` plus the block's attention branch, with
    the attention's ``q``, ``k`` ``[B, H, T, head_dim]``. ToMe (``envs.vit.tome``) merges tokens between it and
    :func:`mlp_residual`."""
    attn_out, q, k = attention(block.attn, block.norm1(x), key_bias, training)
    return x + block.drop_path1(block.ls1(attn_out)), q, k


def mlp_residual(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The second half of timm ``Block.forward``: tokens ``x [B, T, D]`` plus the block's MLP branch."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _block(block: Block, x: torch.Tensor, key_bias: torch.Tensor | None,
           training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Block.forward`` built from its modules; returns the new tokens and the block's ``q``, ``k``."""
    x, q, k = attention_residual(block, x, key_bias, training)
    return mlp_residual(block, x), q, k


def check_prunable(vit: nn.Module) -> None:
    """A ``UsageError`` unless ``vit`` is a timm ViT that :class:`StagedViT` can split and prune: a plain
    ``VisionTransformer`` (or DeiT's distilled one) of standard blocks, whose MACs ``envs.vit.flops`` counts,
    pooled by its class token or an average. ``backbone.py`` asks before it trains one."""
    if type(vit) not in (VisionTransformer, VisionTransformerDistilled):  # other subclasses change more
        raise UsageError(f"StagedViT needs a plain timm VisionTransformer (or DeiT's distilled one), got "
                         f"{type(vit).__name__}")
    for i, blk in enumerate(vit.blocks):
        if (type(blk) is not Block or type(blk.attn) is not Attention or getattr(blk.attn, "gate", None)
                or type(blk.mlp) is not Mlp):
            raise UsageError(f"StagedViT supports only standard timm Block/Attention/Mlp; block {i} is "
                             f"{type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}/"
                             f"{type(getattr(blk, 'mlp', None)).__name__}")
    if vit.attn_pool is not None or vit.global_pool not in ("token", "avg"):
        raise UsageError(f"StagedViT supports global_pool 'token' or 'avg', got {vit.global_pool!r}")
    if len(vit.blocks) < 2:
        raise UsageError(f"a ViT of {len(vit.blocks)} block(s) has no pruning point: it needs two blocks or more")
    embed = vit.patch_embed
    grid = "x".join(map(str, embed.grid_size))
    padded = [-(-side // patch) for side, patch in zip(embed.img_size, embed.patch_size, strict=True)]
    if getattr(embed, "dynamic_img_pad", False) and padded != list(embed.grid_size):
        # timm then runs more patches than its grid: the position embedding fails, or with dynamic_img_size the
        # model runs other token counts than those pruned and counted
        raise UsageError(f"dynamic_img_pad pads its {embed.img_size[0]}-px images to {'x'.join(map(str, padded))} "
                         f"patches of {embed.patch_size[0]} px, not the {grid} grid it is built for (and prunes): "
                         f"give an img_size that is a multiple of patch_size, or leave dynamic_img_pad out")
    if embed.num_patches < 2:
        raise UsageError(f"its patch grid is {grid} ({embed.num_patches} patch tokens): pruning needs two "
                         f"or more (a larger img_size or a smaller patch_size)")


DEFAULT_PRUNE_POINTS: tuple[int, ...] = (3, 6, 9)
"""The blocks before which a 12-block ViT prunes unless told otherwise: three points, one every quarter."""


class PrunePointsError(UsageError):
    """Pruning points that a backbone cannot be split at (:class:`StagedViT`): a command that took them from a flag
    (``--prune-points``, ``--cascade-points``) adds its name and value, which only the command knows."""


class StagedViT(nn.Module):
    """A timm ``VisionTransformer`` split into stages at pruning points (see docs/DESIGN.md).

    ``prune_points=(3, 6, 9)`` on 12 blocks gives stages ``[0, 3), [3, 6), [6, 9), [9, 12)``.
    """

    def __init__(self, vit: VisionTransformer, prune_points: Sequence[int] = DEFAULT_PRUNE_POINTS) -> None:
        super().__init__()
        check_prunable(vit)
        depth = len(vit.blocks)
        # 3 or "3,6" is refused naming what was given, not a TypeError; none would prune nothing at any budget
        points = prune_points if isinstance(prune_points, str | bytes) or not isinstance(prune_points, Iterable) \
            else tuple(prune_points)
        valid = isinstance(points, tuple) and points and all(isinstance(p, Integral) and 1 <= p <= depth - 1
                                                             for p in points)
        if not valid or any(a >= b for a, b in pairwise(points)):
            raise PrunePointsError(f"prune_points must be one or more strictly increasing integers in "
                                   f"[1, {depth - 1}] for a {depth}-block ViT, as a sequence such as (3,), "
                                   f"got {points!r}")
        self.vit = vit
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_patches: int = vit.patch_embed.num_patches
        self.grid_size: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.embed_dim: int = vit.embed_dim
        self.num_heads: int = vit.blocks[0].attn.num_heads
        self.depth = depth
        self.prune_points: tuple[int, ...] = tuple(int(p) for p in points)
        self.num_stages = len(points) + 1
        bounds = (0, *self.prune_points, depth)
        self.stage_blocks: list[range] = [range(a, b) for a, b in pairwise(bounds)]
        self._pool_include_prefix = getattr(vit, "pool_include_prefix", False)  # absent in older timm

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W]`` -> tokens ``[B, P + N, D]``, as timm's forward_features does.

        The images must give the ``N`` patches the model was built for: budgets, token schedules and GFLOPs
        are counted at that size (a ``dynamic_img_size`` model runs at it too, and nowhere else here).
        """
        vit = self.vit
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        if tokens.shape[1] != self.num_prefix_tokens + self.num_patches:
            raise UsageError(f"images of {tuple(images.shape[-2:])} pixels give "
                             f"{tokens.shape[1] - self.num_prefix_tokens} patches; this model prunes the "
                             f"{self.num_patches} of its input size {tuple(vit.patch_embed.img_size)}")
        return tokens

    def _with_prefix(self, live: torch.Tensor) -> torch.Tensor:
        """``live [B, N]`` -> ``[B, P + N]`` bool, prefix tokens always live."""
        return torch.cat([live.new_ones(live.shape[0], self.num_prefix_tokens), live], dim=1)

    def key_bias(self, x: torch.Tensor, live: torch.Tensor | None,
                 size: torch.Tensor | None) -> torch.Tensor | None:
        """Additive attention bias ``[B, 1, 1, P + N]``: ``log(size)`` on patch keys, ``-inf`` on dead ones."""
        if live is None and size is None:
            return None
        bias = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        if size is not None:
            bias[:, self.num_prefix_tokens:] = size.log().to(x.dtype)
        if live is not None:
            bias = bias.masked_fill(~self._with_prefix(live), float("-inf"))
        return bias[:, None, None, :]

    def forward_stage(self, x: torch.Tensor, stage: int, live: torch.Tensor | None = None,
                      size: torch.Tensor | None = None, attention_score: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks of ``stage``.

        Args:
            x: ``[B, P + N, D]`` tokens.
            stage: ``0 .. num_stages - 1``.
            live: ``[B, N]`` bool, False on padded patch tokens (masked out as keys), or None if all live.
            size: ``[B, N]`` original patches each patch token stands for (merged tokens,
                ``envs.vit.token_merge``): keys get attention in proportion to it. None: all 1.
            attention_score: whether to compute ``cls_attention``; without a class token it costs a full
                attention map, which ``envs.vit.flops`` counts only for the selectors that read it.

        Returns:
            ``x [B, P + N, D]`` and ``cls_attention [B, N]``: the class token's attention to each patch
            token in the stage's last block, mean over heads, 0 on padded tokens (without a class token:
            the mean attention each patch token receives); None when not ``attention_score``.
        """
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages - 1}], got {stage}")
        key_bias = self.key_bias(x, live, size)
        for i in self.stage_blocks[stage]:
            x, q, k = _block(self.vit.blocks[i], x, key_bias, self.training)
        if not attention_score:
            return x, None
        scorer = cls_attention_row if self.vit.has_class_token else mean_attention_received
        return x, scorer(q, k, key_bias, self.num_prefix_tokens)

    def classify(self, x: torch.Tensor, live: torch.Tensor | None = None,
                 size: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from tokens ``x [B, P + N, D]``, as timm's forward_head.

        With ``global_pool='avg'`` only live patch tokens (``live [B, N]``) are averaged, each weighted by
        its ``size [B, N]`` (merged tokens) when given.
        """
        vit = self.vit
        x = vit.norm(x)
        if isinstance(vit, VisionTransformerDistilled):  # class and distillation heads, averaged
            return vit.forward_head(x)
        if vit.global_pool == "token":
            pooled = x[:, 0]
        elif live is None and size is None:
            pooled = x[:, 0 if self._pool_include_prefix else self.num_prefix_tokens:].mean(dim=1)
        else:
            weight = torch.ones_like(x[:, self.num_prefix_tokens:, 0]) if live is None else live.to(x.dtype)
            if size is not None:
                weight = weight * size.to(x.dtype)
            if self._pool_include_prefix:
                weight = torch.cat([weight.new_ones(weight.shape[0], self.num_prefix_tokens), weight], dim=1)
            weight = weight.unsqueeze(-1)
            pooled = (x[:, -weight.shape[1]:] * weight).sum(dim=1) / weight.sum(dim=1)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Keep-all forward through every stage: the same logits as the wrapped ViT."""
        return self.forward_from(self.embed(images), 0)

    def forward_from(self, x: torch.Tensor, stage: int, size: torch.Tensor | None = None) -> torch.Tensor:
        """Keep-all logits ``[B, num_classes]`` of tokens ``x [B, P + N, D]`` that have run the stages before
        ``stage`` (all patch tokens live): the unpruned model's answer without running those stages again, or,
        with the ``size [B, N]`` of merged tokens, the answer of a pruned state kept whole from ``stage`` on."""
        for later in range(stage, self.num_stages):
            x, _ = self.forward_stage(x, later, size=size, attention_score=False)
        return self.classify(x, size=size)
