"""ToMe (Bolya et al., ICLR 2023, facebookresearch/ToMe): training-free token merging in every block.

The most used training-free token reducer, evaluated beside the heuristics and the agents at equal GFLOPs.
As in ToMe's timm patch, each block runs attention with proportional attention (``log(size)`` on the keys),
then merges ``r`` tokens by bipartite soft matching on the keys averaged over heads (size-weighted means),
then runs the MLP. Prefix tokens (class, distillation, register) are never merged. ToMe alternates the whole
sequence into its two sets, the class token included but never matched, and keeps set A's unmerged tokens in
order so that the class token stays first; matching here runs over the patch tokens, with the alternation
starting where ToMe's would, so a model with a class token merges exactly as ToMe's timm patch does. Every
prefix token stays in front, where the model's head reads it.
:func:`tome_schedule` picks the merges per block whose GFLOPs (``envs.vit.flops.tome_gflops``) come closest
to a target, so ToMe is compared at the cost of the other methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from envs.vit.flops import ViTSpec, tome_gflops
from envs.vit.staged_vit import StagedViT, attention_residual, mlp_residual

Merge = Callable[[torch.Tensor, str], torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 0) -> Merge:
    """ToMe's matching: alternate tokens into sets A and B, join each A token to its most similar B token,
    and merge the ``r`` most similar pairs.

    Args:
        metric: ``[B, N, C]`` the patch tokens' keys averaged over heads.
        r: tokens to remove (at most the size of set A).
        num_prefix: prefix tokens before the patch tokens. ToMe alternates the whole sequence, so with an odd
            count set A starts at the second patch token; with any, set A's unmerged tokens keep their order
            (ToMe sorts them to keep the class token first), without, the most similar come first, as in ToMe.

    Returns:
        ``merge(x [B, N, C'], mode) -> [B, N - r, C']``, reducing merged tokens with ``mode`` ("sum", "mean").
    """
    set_a, set_b = slice(num_prefix % 2, None, 2), slice(1 - num_prefix % 2, None, 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., set_a, :], metric[..., set_b, :]
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unmerged_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        if num_prefix:
            unmerged_idx = unmerged_idx.sort(dim=-2).values
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., set_a, :], x[..., set_b, :]
        n, t1, c = src.shape
        unmerged = src.gather(dim=-2, index=unmerged_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unmerged, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted average: ``x [B, N, C]`` and ``size [B, N, 1]`` after ``merge``."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def tome_forward(staged: StagedViT, images: torch.Tensor, merges: Sequence[int]) -> torch.Tensor:
    """Logits ``[B, num_classes]`` of the ViT with ``merges[l]`` tokens merged in block ``l``."""
    vit, prefix = staged.vit, staged.num_prefix_tokens
    x = staged.embed(images)
    size = torch.ones(*x.shape[:2], 1, device=x.device, dtype=x.dtype)
    for block, r in zip(vit.blocks, merges, strict=True):
        x, _, k = attention_residual(block, x, staged.key_bias(x, None, size[:, prefix:, 0]), False)
        if r > 0:
            merge = bipartite_soft_matching(k.mean(dim=1)[:, prefix:], r, prefix)
            patches, patch_size = merge_wavg(merge, x[:, prefix:], size[:, prefix:])
            x, size = torch.cat([x[:, :prefix], patches], 1), torch.cat([size[:, :prefix], patch_size], 1)
        x = mlp_residual(block, x)
    return staged.classify(x, None, size[:, prefix:, 0])


def tome_schedule(spec: ViTSpec, target_gflops: float) -> list[int]:
    """Merges per block (ToMe's constant ``r``, plus one more in the first blocks) whose GFLOPs come closest
    to ``target_gflops``; each block merges at most half of its patch tokens, as ToMe does."""
    candidates = []
    for r in range(spec.num_patches // 2 + 1):
        for extra in range(spec.depth):
            merges, tokens = [], spec.num_patches
            for block in range(spec.depth):
                merges.append(min(r + (block < extra), tokens // 2))
                tokens -= merges[-1]
            candidates.append(merges)
    return min(candidates, key=lambda merges: abs(tome_gflops(spec, merges).total - target_gflops))
