"""Merging removed tokens (ToMe): sizes add up, values are size-weighted means, and a merged token of size s
attends exactly like s identical copies; ``drop`` is plain gathering."""

from __future__ import annotations

import pytest
import timm
import torch

from envs.vit.staged_vit import StagedViT
from envs.vit.token_merge import reduce_tokens
from envs.vit.token_ops import gather_tokens, pack_keep_mask
from tests.conftest import TINY_KWARGS


def test_merge_is_the_size_weighted_mean_of_each_kept_token_and_its_nearest_removed_ones():
    prefix = torch.tensor([[[9.0, 9.0]]])
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0], [1.0, 0.2]]])
    x = torch.cat([prefix, patches], dim=1)
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0]])
    live = torch.ones(1, 5, dtype=torch.bool)
    keep_index = torch.tensor([[0, 1]])
    out, out_size = reduce_tokens(x, size, live, keep_index, torch.ones(1, 2, dtype=torch.bool), 1, "merge")
    # tokens 2 and 4 point along token 0, token 3 along token 1
    expected0 = (1 * patches[0, 0] + 3 * patches[0, 2] + 1 * patches[0, 4]) / 5
    expected1 = (2 * patches[0, 1] + 1 * patches[0, 3]) / 3
    torch.testing.assert_close(out, torch.stack([prefix[0, 0], expected0, expected1]).unsqueeze(0))
    assert out_size.tolist() == [[5.0, 3.0]]


def test_drop_is_gathering_and_keeps_sizes():
    x = torch.randn(2, 1 + 6, 4)
    size = torch.rand(2, 6) + 1
    keep_index = torch.tensor([[0, 3, 5], [1, 2, 4]])
    out, out_size = reduce_tokens(x, size, torch.ones(2, 6, dtype=torch.bool), keep_index,
                                  torch.ones(2, 3, dtype=torch.bool), 1, "drop")
    assert torch.equal(out, gather_tokens(x, keep_index, 1))
    assert torch.equal(out_size, size.gather(1, keep_index))


def test_merge_with_padding_conserves_each_images_patches():
    """Padded images (different live and kept counts): sizes of the kept live tokens sum to the live sizes,
    dead tokens merge nowhere, and a removed token 0 is merged even though padded indices point at it."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 + 8, 6, generator=generator)
    size = torch.randint(1, 4, (3, 8), generator=generator).float()
    live = torch.tensor([[True] * 8, [True] * 5 + [False] * 3, [True] * 3 + [False] * 5])
    keep = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1, 1, 1]]).bool()
    index, live_after = pack_keep_mask(keep, live)
    out, out_size = reduce_tokens(x, size, live, index, live_after, 2, "merge")
    assert out.shape == (3, 2 + index.shape[1], 6) and torch.equal(out[:, :2], x[:, :2])
    merged_total = (out_size * live_after).sum(1)
    torch.testing.assert_close(merged_total, (size * live).sum(1))
    assert (out_size[~live_after] == 1).all()


@pytest.mark.parametrize("kwargs", [{}, {"class_token": False, "global_pool": "avg"}])
def test_a_token_of_size_two_acts_like_two_copies(kwargs):
    """Proportional attention: log(size) on the keys makes one token of size s equal to s identical ones."""
    torch.manual_seed(0)
    staged = StagedViT(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS, **kwargs).eval(), (1,))
    prefix = staged.num_prefix_tokens
    with torch.no_grad():
        x, _ = staged.forward_stage(staged.embed(torch.randn(1, 3, 32, 32)), 0)
        copies = torch.cat([x, x[:, prefix:prefix + 1]], dim=1)  # patch token 0 twice
        size = torch.ones(1, staged.num_patches)
        size[0, 0] = 2.0
        merged, merged_attention = staged.forward_stage(x, 1, None, size)
        copied, copied_attention = staged.forward_stage(copies, 1)
        torch.testing.assert_close(merged, copied[:, :-1], atol=1e-5, rtol=1e-5)
        if staged.vit.has_class_token:  # the class token attends to the pair as to the merged token
            both = copied_attention[:, 0] + copied_attention[:, -1]
            torch.testing.assert_close(merged_attention[:, 0], both, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(staged.classify(merged, None, size), staged.classify(copied), atol=1e-5,
                                   rtol=1e-5)
