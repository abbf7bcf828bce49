"""ToMe: bipartite soft matching and size-weighted merging as in facebookresearch/ToMe, its GFLOPs, and the
schedule that matches a target cost."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from envs.vit.flops import ViTSpec, tome_gflops
from envs.vit.staged_vit import StagedViT
from envs.vit.tome import bipartite_soft_matching, merge_wavg, tome_forward, tome_schedule

TINY = {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 10}


@pytest.fixture(scope="module")
def staged() -> StagedViT:
    torch.manual_seed(0)
    return StagedViT(timm.create_model("vit_tiny_patch16_224", **TINY).eval(), (1, 2, 3))


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
