"""ToMe: bipartite soft matching and size-weighted merging as in facebookresearch/ToMe, its GFLOPs, and the
schedule that matches a target cost."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from envs.vit.flops import ViTSpec, tome_gflops
from envs.vit.staged_vit import StagedViT
from envs.vit.tome import bipartite_soft_matching, merge_wavg, tome_forward, tome_schedule
from tests.conftest import TINY_KWARGS


@pytest.fixture(scope="module")
def staged() -> StagedViT:
    torch.manual_seed(0)
    return StagedViT(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS).eval(), (1, 2, 3))


def test_matching_merges_the_most_similar_pairs_and_keeps_sizes():
    # A = tokens 0, 2, 4; B = tokens 1, 3, 5. Token 2 duplicates token 3, token 0 nearly duplicates token 1.
    metric = torch.tensor([[[1.0, 0.1, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]]])
    merge = bipartite_soft_matching(metric, 1)
    x = torch.arange(6.0).view(1, 6, 1)
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0], [1.0], [1.0]]])
    merged, merged_size = merge_wavg(merge, x, size)
    assert merged_size.sum() == size.sum() and merged.shape == (1, 5, 1)
    assert merged_size.flatten().tolist() == [1.0, 1.0, 1.0, 3.0, 1.0]  # unmerged A (0, 4), then B (1, 3, 5)
    assert merged[0, 3, 0] == pytest.approx((2 * 2 + 3) / 3)  # token 2 (size 2) merged into token 3


def test_no_merges_is_the_unpruned_model(staged):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tome_forward(staged, images, [0] * 4), staged.vit(images))


def test_gflops_match_the_flop_counter(staged):
    merges = [8, 8, 6, 4]
    images = torch.randn(2, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        tome_forward(staged, images, merges)
    counted = counter.get_total_flops() / 2 / 2 / 1e9
    spec = ViTSpec.from_model(staged.vit)
    assert tome_gflops(spec, merges).total == pytest.approx(counted, rel=0.02)
    assert tome_gflops(spec, merges).total < tome_gflops(spec, [0] * 4).total


def test_schedule_comes_close_to_the_target(staged):
    spec = ViTSpec.from_model(staged.vit)
    full = tome_gflops(spec, [0] * 4).total
    for fraction in (0.4, 0.6, 0.8):
        merges = tome_schedule(spec, fraction * full)
        assert tome_gflops(spec, merges).total == pytest.approx(fraction * full, rel=0.05)
        assert merges == sorted(merges, reverse=True)


def reference_merge(tokens: torch.Tensor, unmerged_idx: torch.Tensor, src_idx: torch.Tensor,
                    dst_idx: torch.Tensor) -> torch.Tensor:
    """ToMe's ``merge(x, mode="sum")``: set A's unmerged tokens, then set B's with A's merged ones added."""
    src, dst = tokens[:, ::2], tokens[:, 1::2]
    unmerged = src.gather(1, unmerged_idx.expand(-1, -1, tokens.shape[-1]))
    src = src.gather(1, src_idx.expand(-1, -1, tokens.shape[-1]))
    return torch.cat([unmerged, dst.scatter_reduce(1, dst_idx.expand(-1, -1, tokens.shape[-1]), src, "sum")], 1)


def reference_tome_logits(vit, images: torch.Tensor, merges: list[int]) -> torch.Tensor:
    """facebookresearch/ToMe's merge.py and timm patch, line by line, for a ViT with a class token: the whole
    sequence alternates into sets A and B, the class token (first in A) never matches, A's unmerged tokens
    are sorted back into order."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    size = torch.ones_like(x[..., :1])
    for block, r in zip(vit.blocks, merges, strict=True):
        attn, tokens = block.attn, block.norm1(x)
        q, k, v = attn.qkv(tokens).reshape(*tokens.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :, 0]).softmax(-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).flatten(2))
        if r > 0:
            metric = k.mean(1) / k.mean(1).norm(dim=-1, keepdim=True)
            scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
            scores[:, 0, :] = -math.inf
            node_max, node_idx = scores.max(dim=-1)
            edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
            unmerged_idx, src_idx = edge_idx[:, r:].sort(dim=1).values, edge_idx[:, :r]
            indices = unmerged_idx, src_idx, node_idx[..., None].gather(dim=1, index=src_idx)
            x, size = reference_merge(x * size, *indices), reference_merge(size, *indices)
            x = x / size
        x = x + block.mlp(block.norm2(x))
    return vit.forward_head(vit.norm(x))


def test_merges_as_tomes_own_code_with_a_class_token(staged):
    images = torch.randn(4, 3, 32, 32)
    spec = ViTSpec.from_model(staged.vit)
    merges = tome_schedule(spec, 0.5 * tome_gflops(spec, [0] * 4).total)
    assert min(merges) > 0 and any(r % 2 for r in merges)  # odd token counts after some blocks
    with torch.no_grad():
        torch.testing.assert_close(tome_forward(staged, images, merges),
                                   reference_tome_logits(staged.vit, images, merges), atol=1e-5, rtol=1e-5)
