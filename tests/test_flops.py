"""Analytic GFLOPs agree with PyTorch's FlopCounterMode, unpruned and pruned, and the reference geometry."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from envs.vit.features import cosine_similarity, token_features
from envs.vit.flops import (
    ViTSpec,
    backbone_gflops,
    block_macs,
    exact_budget_schedule,
    feature_gflops,
    image_gflops,
    matching_ratio,
    merge_gflops,
    schedule_tokens,
    unpruned_gflops,
)
from envs.vit.pruned_forward import exact_forward
from envs.vit.staged_vit import StagedViT
from policies.heuristics import HEURISTICS, heuristic_selector
from policies.pruned_vit import PrunedViT
from tests.conftest import TINY_KWARGS

REFERENCE_SPEC = ViTSpec(embed_dim=192, depth=12, num_heads=3, mlp_hidden=768, patch_size=(4, 4), in_chans=3,
                         num_patches=64, num_prefix_tokens=1, num_classes=10)
"""The reference backbone's geometry (``test_reference_geometry`` checks it against the timm model)."""


def counted_gmacs(fn, batch: int) -> float:
    """FlopCounterMode's count per image, in GMACs. The math SDPA backend makes the attention matmuls
    visible to the counter (it does not count PyTorch's fused CPU kernel)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return counter.get_total_flops() / 2 / batch / 1e9


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS).eval()


def test_spec_from_model(vit):
    assert ViTSpec.from_model(vit) == ViTSpec(embed_dim=48, depth=4, num_heads=3, mlp_hidden=192,
                                              patch_size=(4, 4), in_chans=3, num_patches=64,
                                              num_prefix_tokens=1, num_classes=10)


def test_unpruned_matches_flop_counter(vit):
    images = torch.randn(2, 3, 32, 32)
    spec = ViTSpec.from_model(vit)
    analytic = backbone_gflops(spec, [65] * spec.depth)
    assert analytic == pytest.approx(counted_gmacs(lambda: vit(images), 2), rel=0.02)


@pytest.mark.parametrize("reduction", ["drop", "merge"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_pruned_matches_flop_counter(vit, ratio, reduction):
    images = torch.randn(2, 3, 32, 32)
    staged = StagedViT(vit, prune_points=(1, 2, 3))
    counted = counted_gmacs(lambda: exact_forward(staged, images, heuristic_selector("attention"), ratio, reduction), 2)
    spec = ViTSpec.from_model(vit)
    kept = exact_budget_schedule(64, 3, ratio)
    analytic = image_gflops(spec, staged.prune_points, kept, reduction, "none").backbone
    assert analytic == pytest.approx(counted, rel=0.02)
    assert analytic < unpruned_gflops(spec) == backbone_gflops(spec, [65] * spec.depth)


def test_reference_geometry():
    """The reference backbone: 5.36 M parameters, 0.365 GMACs with attention matmuls.

    0.346 is the same count without the two attention matmuls (2 * T^2 * D per block): what
    FlopCounterMode reports on CPU with the default fused attention kernel, which it does not count.
    """
    with torch.device("meta"):  # geometry only: skip the weight init
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
    spec = ViTSpec.from_model(vit)
    assert spec == REFERENCE_SPEC
    assert sum(p.numel() for p in vit.parameters()) / 1e6 == pytest.approx(5.36, abs=0.005)
    full = backbone_gflops(spec, [65] * 12)
    assert full == pytest.approx(0.365, rel=0.01)
    attention_matmuls = 12 * 2 * 65 * 65 * spec.embed_dim / 1e9
    assert full - attention_matmuls == pytest.approx(0.346, rel=0.01)


def test_block_macs_formula(vit):
    spec = ViTSpec.from_model(vit)
    x = torch.randn(1, 65, 48)
    counted = counted_gmacs(lambda: vit.blocks[0](x), 1) * 1e9
    assert block_macs(spec, 65) == pytest.approx(counted, rel=1e-6)


def test_feature_gflops_covers_the_counted_matmuls(vit):
    spec = ViTSpec.from_model(vit)
    x, live = torch.randn(1, 64, 48), torch.ones(1, 64, dtype=torch.bool)
    positions = torch.arange(64).unsqueeze(0)
    attention = torch.rand(1, 64)
    counted = counted_gmacs(lambda: token_features(x, attention, live, positions, (8, 8), 0, 1, 0.5), 1)
    assert counted <= feature_gflops(spec, [64]) <= 1.05 * counted
    two_points = feature_gflops(spec, [64]) + feature_gflops(spec, [32])
    assert feature_gflops(spec, [64, 32]) == pytest.approx(two_points)


def test_similarity_scores_cost_the_cosine_matrix(vit):
    spec = ViTSpec.from_model(vit)
    counted = counted_gmacs(lambda: cosine_similarity(torch.randn(1, 64, 48)), 1)
    assert counted <= feature_gflops(spec, [64], "similarity") <= 1.05 * counted
    assert feature_gflops(spec, [64], "attention") == 64 * 48 / 1e9 and feature_gflops(spec, [64], "none") == 0


@pytest.mark.parametrize("name", HEURISTICS)
def test_attention_score_without_a_class_token_counts_every_query_where_it_is_computed(name):
    """Without a class token the attention score is a full attention map: the selections that read it pay
    for it, and the others neither compute nor count it."""
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS, class_token=False,
                            global_pool="avg").eval()
    model = PrunedViT(StagedViT(vit, (1, 2, 3)), {"mean": [0.5] * 3, "std": [0.5] * 3}, name, 0.5, "drop")
    counted = counted_gmacs(lambda: model(torch.randn(2, 3, 32, 32)), 2)
    assert model.gflops().total == pytest.approx(counted, rel=0.002)


def test_image_gflops_adds_its_parts(vit):
    spec = ViTSpec.from_model(vit)
    kept = [64, 32, 16, 8]
    dropped = image_gflops(spec, (1, 2, 3), kept, "drop", "agents", policy_macs_per_token=1000)
    merged = image_gflops(spec, (1, 2, 3), kept, "merge", "agents", policy_macs_per_token=1000)
    assert dropped.backbone == backbone_gflops(spec, schedule_tokens(spec, (1, 2, 3), kept))
    assert merged.backbone == pytest.approx(dropped.backbone + merge_gflops(spec, kept[:-1], kept[1:]))
    assert merged.features == feature_gflops(spec, kept[:-1], "agents")
    assert merged.policies == pytest.approx((64 + 32 + 16) * 1000 / 1e9)
    assert merged.total == pytest.approx(merged.backbone + merged.features + merged.policies)


def test_schedules():
    spec = REFERENCE_SPEC
    assert exact_budget_schedule(64, 3, 0.5) == [64, 32, 16, 8]
    assert exact_budget_schedule(64, 3, 0.9) == [64, 6, 1, 1]
    assert schedule_tokens(spec, (3, 6, 9), [64, 32, 16, 8]) == [65] * 3 + [33] * 3 + [17] * 3 + [9] * 3
    with pytest.raises(ValueError, match="per-stage counts"):
        schedule_tokens(spec, (3, 6, 9), [64, 32])
    with pytest.raises(ValueError, match="one per block"):
        backbone_gflops(spec, [65] * 11)


def test_matching_ratio_is_the_least_removal_within_the_cost():
    spec = REFERENCE_SPEC

    def cost(points, ratio, scores="similarity", macs=0.0):
        return image_gflops(spec, points, exact_budget_schedule(64, len(points), ratio), "merge", scores, macs).total

    target = cost((3, 6, 9), 0.5)
    ratio = matching_ratio(spec, (3, 6, 9), target, "merge", "similarity")
    assert ratio <= 0.5 and exact_budget_schedule(64, 3, ratio) == [64, 32, 16, 8]
    for points in ((2, 5, 8), (1, 3, 5, 7, 9, 11)):
        ratio = matching_ratio(spec, points, target, "merge", "similarity")
        assert cost(points, ratio) <= target < cost(points, ratio - 0.001)
        with_policies = matching_ratio(spec, points, target, "merge", "agents", 25_000)
        assert with_policies > ratio and cost(points, with_policies, "agents", 25_000) <= target
    with pytest.raises(ValueError, match="costs at most"):
        matching_ratio(spec, (3, 6, 9), 0.01, "merge", "similarity")


def test_distilled_deit_counts_both_heads():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **TINY_KWARGS).eval()
    spec = ViTSpec.from_model(deit)
    assert spec.num_prefix_tokens == 2 and spec.num_heads_out == 2
    images = torch.randn(2, 3, 32, 32)
    assert backbone_gflops(spec, [66] * spec.depth) == pytest.approx(counted_gmacs(lambda: deit(images), 2), rel=0.02)
