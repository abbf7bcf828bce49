"""StagedViT reproduces timm's ViT exactly, masks padded tokens, and exposes the class-token attention."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from envs.errors import UsageError
from envs.vit.pruned_forward import classify, initial_state, prune_step
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import gather_tokens, highest, pack_keep_mask
from tests.conftest import TINY_KWARGS

VARIANTS = {
    "class_token": {},
    "registers": {"reg_tokens": 4},
    "layer_scale": {"init_values": 1e-5},
    "avg_pool": {"class_token": False, "global_pool": "avg"},
    "qk_norm_no_embed_class": {"qk_norm": True, "no_embed_class": True, "reg_tokens": 1},
    "avg_pool_with_prefix": {"global_pool": "avg", "reg_tokens": 2, "pool_include_prefix": True},
}


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS, **kwargs).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", [*VARIANTS, "deit_distilled"])
def test_keep_all_forward_matches_timm(variant, images):
    if variant == "deit_distilled":  # class + distillation token, two heads averaged
        torch.manual_seed(0)
        vit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **TINY_KWARGS).eval()
        assert type(vit) is VisionTransformerDistilled and StagedViT(vit, (1,)).num_prefix_tokens == 2
    else:
        vit = tiny_vit(**VARIANTS[variant])
    staged = StagedViT(vit, prune_points=(1, 3))
    with torch.no_grad():
        assert (staged(images) - vit(images)).abs().max() <= 1e-5
        after_first, _ = staged.forward_stage(staged.embed(images), 0)  # the unpruned answer from stage 1 on
        assert (staged.forward_from(after_first, 1) - vit(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["class_token", "avg_pool"])
def test_forward_from_a_merged_state_is_that_state_kept_whole(variant, images):
    """With the merged tokens' sizes, ``forward_from`` is the pruned forward that keeps every token from a
    merged state on (``prune_step`` keeping all, then ``classify``): sizes weigh attention and the average pool."""
    staged = StagedViT(tiny_vit(**VARIANTS[variant]), prune_points=(1, 2, 3))
    with torch.no_grad():
        state = initial_state(staged, images)
        merged = prune_step(staged, state, highest(torch.rand(state.live.shape), 20, state.live), "merge",
                            count=20)
        kept_whole = merged
        while kept_whole.stage < len(staged.prune_points):
            kept_whole = prune_step(staged, kept_whole, kept_whole.live, "merge", count=kept_whole.live.shape[1])
        expected = classify(staged, kept_whole, "merge")
        assert not torch.equal(merged.size, torch.ones_like(merged.size))
        torch.testing.assert_close(staged.forward_from(merged.tokens, merged.stage + 1, merged.size), expected)
        assert not torch.allclose(staged.forward_from(merged.tokens, merged.stage + 1), expected)


def test_attributes():
    staged = StagedViT(tiny_vit(reg_tokens=4), prune_points=(1, 2, 3))
    assert staged.num_prefix_tokens == 5
    assert staged.num_patches == 64 and staged.grid_size == (8, 8)
    assert (staged.embed_dim, staged.num_heads, staged.depth) == (48, 3, 4)
    assert staged.num_stages == 4
    assert staged.stage_blocks == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert sum(p.numel() for p in staged.parameters()) == sum(p.numel() for p in staged.vit.parameters())


def capture_full_attention(vit: VisionTransformer, block: int) -> list[torch.Tensor]:
    """Record block ``block``'s attention matrix [B, H, T, T] from timm's own (unfused) Attention."""
    attn = vit.blocks[block].attn
    attn.fused_attn = False
    captured: list[torch.Tensor] = []
    attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
    return captured


@pytest.mark.parametrize("variant", ["class_token", "registers", "avg_pool"])
def test_cls_attention_matches_full_attention_matrix(variant, images):
    vit = tiny_vit(**VARIANTS[variant])
    staged = StagedViT(vit, prune_points=(2,))
    captured = capture_full_attention(vit, block=1)
    with torch.no_grad():
        vit(images)
        _, cls_attention = staged.forward_stage(staged.embed(images), 0)
    attn, prefix = captured[0], staged.num_prefix_tokens
    if vit.has_class_token:
        expected = attn[:, :, 0, prefix:].mean(dim=1)
    else:
        expected = attn.mean(dim=(1, 2))[:, prefix:]
    assert cls_attention.shape == (3, 64)
    torch.testing.assert_close(cls_attention, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["class_token", "registers", "avg_pool", "avg_pool_with_prefix"])
def test_padding_does_not_change_live_tokens(variant, images):
    """Images keeping different token counts, packed and padded, match each image run alone."""
    staged = StagedViT(tiny_vit(**VARIANTS[variant]), prune_points=(1, 2))
    prefix = staged.num_prefix_tokens
    keep = torch.rand(3, 64, generator=torch.Generator().manual_seed(2)) < torch.tensor([[0.2], [0.5], [0.9]])
    index, live = pack_keep_mask(keep, torch.ones_like(keep))
    assert live.sum(dim=1).tolist() == keep.sum(dim=1).tolist()
    with torch.no_grad():
        x, _ = staged.forward_stage(staged.embed(images), 0)
        padded = gather_tokens(x, index, prefix)
        padded_out, padded_attn = staged.forward_stage(padded, 1, live)
        padded_logits = staged.classify(padded_out, live)
        for i in range(3):
            n = int(live[i].sum())
            alone = gather_tokens(x[i:i + 1], index[i:i + 1, :n], prefix)
            out, attn = staged.forward_stage(alone, 1)
            torch.testing.assert_close(padded_out[i:i + 1, :prefix + n], out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded_attn[i:i + 1, :n], attn, atol=1e-6, rtol=1e-5)
            assert (padded_attn[i, n:] == 0).all()
            torch.testing.assert_close(padded_logits[i:i + 1], staged.classify(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("points", [(0,), (4,), (2, 2), (3, 1), (1.5,), (), 2, "1,2", None])
def test_bad_prune_points(points):
    """An integer or None ended in a TypeError, and none pruned nothing at any budget without a word."""
    with pytest.raises(UsageError, match=r"one or more strictly increasing integers in \[1, 3\] for a 4-block ViT, as "
                                         rf"a sequence such as \(3,\), got {re.escape(repr(points))}$"):
        StagedViT(tiny_vit(), prune_points=points)


def test_rejects_nonstandard_models():
    with pytest.raises(UsageError, match="standard timm Block"):
        StagedViT(VisionTransformer(num_classes=10, **TINY_KWARGS, block_fn=ResPostBlock))
    with pytest.raises(UsageError, match="Block/Attention/GluMlp"):  # a gated MLP: its MACs are not a Mlp's
        StagedViT(VisionTransformer(num_classes=10, **TINY_KWARGS, mlp_layer=SwiGLUPacked))
    with pytest.raises(UsageError, match="plain timm VisionTransformer"):
        StagedViT(torch.nn.Linear(2, 2))
    with pytest.raises(UsageError, match="global_pool"):
        StagedViT(tiny_vit(global_pool="map"), prune_points=(1,))


def test_images_must_give_the_patches_the_model_prunes():
    """A dynamic_img_size model runs at its own size; at another, the budgets and GFLOPs would be counted for
    the wrong number of patches."""
    staged = StagedViT(tiny_vit(dynamic_img_size=True), prune_points=(2,))
    assert staged.embed(torch.randn(1, 3, 32, 32)).shape == (1, 65, 48)
    with pytest.raises(UsageError, match=r"images of \(48, 48\) pixels give 144 patches; this model prunes the 64"):
        staged.embed(torch.randn(1, 3, 48, 48))


def test_bad_stage_index(images):  # only a bug asks for a stage the model lacks: a plain ValueError
    staged = StagedViT(tiny_vit(), prune_points=(2,))
    with pytest.raises(ValueError, match="stage must be in") as error:
        staged.forward_stage(staged.embed(images), 2)
    assert not isinstance(error.value, UsageError)
