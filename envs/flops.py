"""Analytic GFLOPs of a ViT for any token schedule, in multiply-accumulates (DeiT/fvcore convention).

Counted: the patch-embedding convolution, every linear layer, the two attention matmuls (``q @ k^T`` and
``attn @ v``) and the head; norms, activations, softmax and additions are left out, as fvcore does.
``FlopCounterMode`` counts 2 per MAC, so its total / 2 is comparable. Beware: on CPU it does not see
PyTorch's fused scaled-dot-product-attention kernel and so misses the attention matmuls unless run under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from timm.models.vision_transformer import VisionTransformer

from envs.token_ops import tokens_to_keep


@dataclass(frozen=True)
class ViTSpec:
    """The geometry of a plain ViT that its cost depends on."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: tuple[int, int]
    in_chans: int
    num_patches: int
    num_prefix_tokens: int
    num_classes: int

    @classmethod
    def from_model(cls, vit: VisionTransformer) -> ViTSpec:
        """The spec of a timm VisionTransformer with standard blocks."""
        block = vit.blocks[0]
        return cls(
            embed_dim=vit.embed_dim,
            depth=len(vit.blocks),
            num_heads=block.attn.num_heads,
            mlp_hidden=block.mlp.fc1.out_features,
            patch_size=tuple(vit.patch_embed.patch_size),
            in_chans=vit.patch_embed.proj.in_channels,
            num_patches=vit.patch_embed.num_patches,
            num_prefix_tokens=vit.num_prefix_tokens,
            num_classes=vit.num_classes,
        )


def block_macs(spec: ViTSpec, tokens: float) -> float:
    """MACs of one transformer block on ``tokens`` tokens (prefix included).

    qkv ``3TD^2`` + attention matmuls ``2T^2D`` + projection ``TD^2`` + MLP ``2TD*mlp_hidden``.
    """
    d = spec.embed_dim
    return tokens * (4 * d * d + 2 * d * spec.mlp_hidden) + 2 * tokens * tokens * d


def backbone_gflops(spec: ViTSpec, tokens_per_block: Sequence[float]) -> float:
    """GFLOPs (GMACs) of patch embedding + blocks + head for one image.

    Args:
        spec: model geometry.
        tokens_per_block: tokens entering each of the ``depth`` blocks, prefix included; may be
            fractional (a mean over images is not exact: the attention term is quadratic).
    """
    if len(tokens_per_block) != spec.depth:
        raise ValueError(f"need {spec.depth} token counts (one per block), got {len(tokens_per_block)}")
    ph, pw = spec.patch_size
    patch_embed = spec.num_patches * spec.in_chans * ph * pw * spec.embed_dim
    head = spec.embed_dim * spec.num_classes
    return (patch_embed + sum(block_macs(spec, t) for t in tokens_per_block) + head) / 1e9


def schedule_tokens(spec: ViTSpec, prune_points: Sequence[int],
                    kept_patch_tokens_per_stage: Sequence[float]) -> list[float]:
    """Tokens entering each block (prefix included) given the patch tokens alive in each stage.

    ``prune_points=(3, 6, 9)`` and ``kept=(64, 32, 16, 8)`` on 12 blocks with 1 prefix token gives
    ``[65] * 3 + [33] * 3 + [17] * 3 + [9] * 3``.
    """
    if len(kept_patch_tokens_per_stage) != len(prune_points) + 1:
        raise ValueError(f"need {len(prune_points) + 1} per-stage counts for prune points "
                         f"{tuple(prune_points)}, got {len(kept_patch_tokens_per_stage)}")
    bounds = (0, *prune_points, spec.depth)
    tokens: list[float] = []
    for (start, stop), kept in zip(pairwise(bounds), kept_patch_tokens_per_stage, strict=True):
        tokens += [spec.num_prefix_tokens + kept] * (stop - start)
    return tokens


def feature_gflops(spec: ViTSpec, live_tokens_per_point: Sequence[float]) -> float:
    """GFLOPs (GMACs) of the agents' features at each pruning point (``envs.features``), per image.

    With ``N`` live patch tokens: class-token attention row ``N*D`` (summed over heads), token norms
    ``N*D`` and the cosine-similarity matrix ``N^2*D``.
    """
    d = spec.embed_dim
    return sum(2 * n * d + n * n * d for n in live_tokens_per_point) / 1e9


def merge_gflops(spec: ViTSpec, live_tokens_per_point: Sequence[float],
                 kept_tokens_per_point: Sequence[float]) -> float:
    """GFLOPs (GMACs) of merging the removed tokens into the kept ones (``envs.token_merge``), per image.

    At a pruning point with ``n`` live and ``k`` kept patch tokens: normalising the tokens ``n*D`` and
    their cosine similarity to the kept ones ``n*k*D``; the weighted sums are additions, not counted.
    """
    d = spec.embed_dim
    return sum(n * d + n * k * d for n, k in zip(live_tokens_per_point, kept_tokens_per_point, strict=True)) / 1e9


def heuristic_schedule(num_patches: int, num_prune_points: int, target_ratio: float) -> list[int]:
    """Patch tokens alive in each of the ``num_prune_points + 1`` stages at an exact budget.

    ``heuristic_schedule(64, 3, 0.5) == [64, 32, 16, 8]``.
    """
    schedule = [num_patches]
    for _ in range(num_prune_points):
        schedule.append(tokens_to_keep(schedule[-1], target_ratio))
    return schedule
