"""Analytic GFLOPs of a ViT for any token schedule, in multiply-accumulates (DeiT/fvcore convention).

Counted: the patch-embedding convolution, every linear layer, the two attention matmuls (``q @ k^T`` and
``attn @ v``) and the head; norms, activations, softmax and additions are left out. fvcore leaves out the
last three too but counts layer norms (5 per element with an affine transform): 0.4% of a ViT-Tiny's total,
its 1.26 GFLOPs for DeiT-Tiny at 224 px against 1.254 here.
``FlopCounterMode`` counts 2 per MAC, so its total / 2 is comparable. Beware: on CPU it does not see
PyTorch's fused scaled-dot-product-attention kernel and so misses the attention matmuls unless run under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, NamedTuple

from timm.models.vision_transformer import VisionTransformer

from envs.errors import UsageError
from envs.vit.token_ops import tokens_to_keep


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
    num_heads_out: int = 1  # classifier heads: 2 for DeiT's class and distillation heads
    has_class_token: bool = True  # without one, the attention score needs every query (feature_gflops)

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
            num_heads_out=2 if hasattr(vit, "head_dist") else 1,
            has_class_token=vit.has_class_token,
        )


def block_macs(spec: ViTSpec, tokens: float, mlp_tokens: float | None = None) -> float:
    """MACs of one transformer block on ``tokens`` tokens (prefix included), its MLP on ``mlp_tokens`` of them
    (all by default; fewer where tokens merge between attention and MLP, as in ToMe).

    qkv ``3TD^2`` + attention matmuls ``2T^2D`` + projection ``TD^2`` + MLP ``2T'D*mlp_hidden``.
    """
    d = spec.embed_dim
    mlp_tokens = tokens if mlp_tokens is None else mlp_tokens
    return tokens * 4 * d * d + 2 * tokens * tokens * d + mlp_tokens * 2 * d * spec.mlp_hidden


def embed_and_head_macs(spec: ViTSpec) -> float:
    """MACs of the patch embedding and the classifier head(s) for one image: what no pruning changes."""
    ph, pw = spec.patch_size
    patch_embedding = spec.num_patches * spec.in_chans * ph * pw * spec.embed_dim
    return patch_embedding + spec.embed_dim * spec.num_classes * spec.num_heads_out


def backbone_gflops(spec: ViTSpec, tokens_per_block: Sequence[float]) -> float:
    """GFLOPs (GMACs) of patch embedding + blocks + head for one image.

    Args:
        spec: model geometry.
        tokens_per_block: tokens entering each of the ``depth`` blocks, prefix included; may be
            fractional (a mean over images is not exact: the attention term is quadratic).
    """
    if len(tokens_per_block) != spec.depth:
        raise ValueError(f"need {spec.depth} token counts (one per block), got {len(tokens_per_block)}")
    return (embed_and_head_macs(spec) + sum(block_macs(spec, t) for t in tokens_per_block)) / 1e9


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


TokenScores = Literal["none", "attention", "similarity", "agents"]
"""What a selector computes at a pruning point to rank tokens (:func:`feature_gflops`)."""


def feature_gflops(spec: ViTSpec, live_tokens_per_point: Sequence[float], scores: TokenScores = "agents") -> float:
    """GFLOPs (GMACs) of the token scores a selector computes at each pruning point, per image.

    With ``N`` live patch tokens: the class-token attention row ``N*D`` (summed over heads; its ``P`` prefix
    keys, ``P*D``, under 1e-6 GMACs a pruning point here, are not counted; without a class token, the attention
    every token receives, ``(P + N)^2*D`` with ``P`` prefix tokens), token norms ``N*D``,
    the cosine-similarity matrix ``N^2*D``. ``scores``: ``none`` (random) computes nothing; ``attention``
    (greedy attention) the attention score; ``similarity`` (greedy similarity) norms and matrix (its iterative
    removal compares, like softmax it is not counted); ``agents`` all three (``envs.vit.features``).
    """
    d, prefix = spec.embed_dim, spec.num_prefix_tokens

    def attention(n: float) -> float:
        return n * d if spec.has_class_token else (prefix + n) ** 2 * d

    cost = {"none": lambda n: 0, "attention": attention, "similarity": lambda n: n * d + n * n * d,
            "agents": lambda n: attention(n) + n * d + n * n * d}[scores]
    return sum(cost(n) for n in live_tokens_per_point) / 1e9


def merge_gflops(spec: ViTSpec, live_tokens_per_point: Sequence[float],
                 kept_tokens_per_point: Sequence[float]) -> float:
    """GFLOPs (GMACs) of merging the removed tokens into the kept ones (``envs.vit.token_merge``), per image.

    At a pruning point with ``n`` live and ``k`` kept patch tokens: normalising the tokens ``n*D`` and
    their cosine similarity to the kept ones ``n*k*D``; the weighted sums are additions, not counted.
    """
    d = spec.embed_dim
    return sum(n * d + n * k * d for n, k in zip(live_tokens_per_point, kept_tokens_per_point, strict=True)) / 1e9


def exact_budget_schedule(num_patches: int, num_prune_points: int, target_ratio: float) -> list[int]:
    """Patch tokens alive in each of the ``num_prune_points + 1`` stages at an exact budget, whatever selects them
    (a heuristic, the agents; ``envs.vit.pruned_forward`` runs this schedule).

    ``exact_budget_schedule(64, 3, 0.5) == [64, 32, 16, 8]``.
    """
    schedule = [num_patches]
    for _ in range(num_prune_points):
        schedule.append(tokens_to_keep(schedule[-1], target_ratio))
    return schedule


class ImageGflops(NamedTuple):
    """GFLOPs (GMACs) of one image's pruned forward, in three parts."""

    backbone: float  # patch embedding, blocks on the image's token schedule, head, and merging
    features: float  # the token scores of the selector (feature_gflops)
    policies: float  # the policy networks on the live tokens

    @property
    def total(self) -> float:
        return self.backbone + self.features + self.policies


def image_gflops(spec: ViTSpec, prune_points: Sequence[int], kept_per_stage: Sequence[float], reduction: str,
                 scores: TokenScores, policy_macs_per_token: float = 0.0) -> ImageGflops:
    """The cost of one image pruned at ``prune_points`` to ``kept_per_stage`` live patch tokens per stage.

    The per-image GFLOPs of every pruning schedule: the training engine reports it per episode and evaluation
    per pruned row. ToMe and the unpruned model, which no schedule describes, have their own
    (:func:`tome_gflops`, :func:`unpruned_gflops`).

    Args:
        kept_per_stage: ``len(prune_points) + 1`` counts, the first being all patches.
        reduction: ``merge`` adds the cost of merging removed tokens (:func:`merge_gflops`).
        scores: what the selector computes at each pruning point (:data:`TokenScores`).
        policy_macs_per_token: multiply-accumulates of the policy networks per live token and pruning point
            (``TokenScoring.macs_per_token``, summed over the modules used).
    """
    live, kept = kept_per_stage[:-1], kept_per_stage[1:]
    backbone = backbone_gflops(spec, schedule_tokens(spec, prune_points, kept_per_stage))
    if reduction == "merge":
        backbone += merge_gflops(spec, live, kept)
    return ImageGflops(backbone, feature_gflops(spec, live, scores), sum(live) * policy_macs_per_token / 1e9)


def exact_budget_gflops(spec: ViTSpec, prune_points: Sequence[int], ratio: float, reduction: str, scores: TokenScores,
                        policy_macs_per_token: float = 0.0) -> ImageGflops:
    """:func:`image_gflops` of an exact budget: ``ratio`` of the live patch tokens removed at each of
    ``prune_points`` (:func:`exact_budget_schedule`)."""
    kept = exact_budget_schedule(spec.num_patches, len(prune_points), ratio)
    return image_gflops(spec, prune_points, kept, reduction, scores, policy_macs_per_token)


def matching_ratio(spec: ViTSpec, prune_points: Sequence[int], target_gflops: float, reduction: str,
                   scores: TokenScores, policy_macs_per_token: float = 0.0) -> float:
    """The smallest removal ratio (in steps of 0.001) whose exact budget at ``prune_points`` costs at most
    ``target_gflops`` (:func:`image_gflops`): how to compare schedules with different pruning points at one cost.

    ``matching_ratio(spec, (3, 6, 9), cost_at_0_5, ...)`` is at most 0.5 and keeps the same tokens. Raises
    :class:`~envs.errors.UsageError` when even removing all but one token per pruning point costs more.
    """
    for step in range(1, 1000):
        ratio = step / 1000
        cost = exact_budget_gflops(spec, prune_points, ratio, reduction, scores, policy_macs_per_token)
        if cost.total <= target_gflops:
            return ratio
    raise UsageError(f"no removal ratio at pruning points {tuple(prune_points)} costs at most {target_gflops:.4f} "
                     "GFLOPs")


def unpruned_gflops(spec: ViTSpec) -> float:
    """GFLOPs (GMACs) of the unpruned model on one image."""
    return backbone_gflops(spec, [spec.num_prefix_tokens + spec.num_patches] * spec.depth)


def tome_gflops(spec: ViTSpec, merges: Sequence[int]) -> ImageGflops:
    """GFLOPs (GMACs) of ToMe (``envs.vit.tome``) merging ``merges[l]`` patch tokens in block ``l``, per image.

    A block attends over its ``t`` incoming tokens (``4tD^2 + 2t^2D``), matches its ``n`` patch tokens on keys
    averaged over heads (normalising ``n*d`` and the bipartite similarity ``(n/2)^2*d``, ``d`` the head
    width; counted as merging, in ``backbone``) and runs its MLP on the ``t - r`` tokens left.
    """
    if len(merges) != spec.depth:
        raise ValueError(f"need {spec.depth} merge counts (one per block), got {len(merges)}")
    head = spec.embed_dim // spec.num_heads
    macs = embed_and_head_macs(spec)
    patches = spec.num_patches
    for r in merges:
        tokens = spec.num_prefix_tokens + patches
        macs += block_macs(spec, tokens, mlp_tokens=tokens - r)
        if r > 0:
            macs += patches * head + ((patches + 1) // 2) * (patches // 2) * head
        patches -= r
    return ImageGflops(macs / 1e9, 0.0, 0.0)
