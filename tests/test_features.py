"""Agent features: shapes, meaning of each column, dead rows zeroed, finite in edge cases."""

from __future__ import annotations

import pytest
import timm
import torch

from envs.vit.features import ATTENTION_FEATURES, SIMILARITY_FEATURES, token_features
from envs.vit.staged_vit import StagedViT

A = {name: i for i, name in enumerate(ATTENTION_FEATURES)}
S = {name: i for i, name in enumerate(SIMILARITY_FEATURES)}


def features(x, attention, live, positions=None, grid=(4, 4), stage=1, num_points=3, keep=0.5):
    if positions is None:
        positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    return token_features(x, attention, live, positions, grid, stage, num_points, keep)


def test_shapes_dtype_and_dead_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=gen, dtype=torch.float64)
    attention = torch.rand(2, 16, generator=gen)
    live = torch.rand(2, 16, generator=gen) < 0.6
    att, sim = features(x, attention, live)
    assert att.shape == (2, 16, len(ATTENTION_FEATURES)) and att.dtype == torch.float32
    assert sim.shape == (2, 16, len(SIMILARITY_FEATURES)) and sim.dtype == torch.float32
    assert (att[~live] == 0).all() and (sim[~live] == 0).all()
    assert torch.isfinite(att).all() and torch.isfinite(sim).all()


def test_attention_columns():
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.05, 0.9]])
    live = torch.tensor([[True, True, True, False, True]])  # dead token's attention must be ignored
    att, _ = features(torch.randn(1, 5, 4), attention, live)
    row = att[0, live[0]]
    torch.testing.assert_close(row[:, A["attention"]].mean(), torch.tensor(1.0))  # uniform = 1
    torch.testing.assert_close(row[:, A["log_attention"]], row[:, A["attention"]].log())
    torch.testing.assert_close(row[:, A["attention_rank"]], torch.tensor([0.0, 2 / 3, 1 / 3, 1.0]))


def test_norm_grid_progress_and_keep_fraction():
    x = torch.zeros(1, 3, 2)
    x[0, :, 0] = torch.tensor([1.0, 2.0, 3.0])
    positions = torch.tensor([[0, 5, 11]])  # (row, col) in a 3x4 grid: (0, 0), (1, 1), (2, 3)
    att, sim = features(x, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), positions, grid=(3, 4),
                        stage=1, num_points=3, keep=0.3)
    for table, cols in ((att, A), (sim, S)):
        torch.testing.assert_close(table[0, :, cols["norm"]], torch.tensor([0.5, 1.0, 1.5]))
        torch.testing.assert_close(table[0, :, cols["row"]], torch.tensor([0.0, 0.5, 1.0]))
        torch.testing.assert_close(table[0, :, cols["col"]], torch.tensor([0.0, 1 / 3, 1.0]))
        torch.testing.assert_close(table[0, :, cols["progress"]], torch.full((3,), 0.5))
        torch.testing.assert_close(table[0, :, cols["keep_fraction"]], torch.full((3,), 0.3))
    live = torch.tensor([[True, True, False], [True, True, True]])  # one keep fraction per image
    att, _ = features(x.expand(2, -1, -1), torch.ones(2, 3), live, positions.expand(2, -1), grid=(3, 4),
                      keep=torch.tensor([0.3, 0.9]))
    torch.testing.assert_close(att[..., A["keep_fraction"]], torch.tensor([[0.3, 0.3, 0.0], [0.9, 0.9, 0.9]]))


def test_cosine_similarity_excludes_self_and_dead_tokens():
    e = torch.eye(4)
    # token 0 and 1 are parallel, token 2 orthogonal to all, token 3 a dead copy of token 2
    x = torch.stack([e[0], 2 * e[0], e[1], e[1]]).unsqueeze(0)
    live = torch.tensor([[True, True, True, False]])
    _, sim = features(x, torch.ones(1, 4), live)
    torch.testing.assert_close(sim[0, :3, S["max_similarity"]], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(sim[0, :3, S["mean_similarity"]], torch.tensor([0.5, 0.5, 0.0]))


def test_single_live_token_is_finite():
    x = torch.randn(3, 6, 4)
    live = torch.zeros(3, 6, dtype=torch.bool)
    live[0, 2] = live[1, 0] = True  # image 2 has no live token at all
    att, sim = features(x, torch.rand(3, 6), live, stage=0, num_points=1)
    assert torch.isfinite(att).all() and torch.isfinite(sim).all()
    assert (att[2] == 0).all() and (sim[2] == 0).all()
    assert att[0, 2, A["attention"]] == 1 and att[0, 2, A["attention_rank"]] == 1
    assert att[0, 2, A["norm"]] == 1 and sim[0, 2, S["max_similarity"]] == 0
    assert att[0, 2, A["progress"]] == 0  # a single pruning point


def test_on_staged_vit_outputs():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=48,
                            num_heads=3, num_classes=10).eval()
    staged = StagedViT(vit, prune_points=(1,))
    with torch.no_grad():
        x, cls_attention = staged.forward_stage(staged.embed(torch.randn(2, 3, 32, 32)), 0)
    live = torch.ones(2, 64, dtype=torch.bool)
    att, sim = features(x[:, 1:], cls_attention, live, grid=staged.grid_size, stage=0, num_points=1)
    assert torch.isfinite(att).all() and torch.isfinite(sim).all()
    torch.testing.assert_close(att[..., A["attention"]].mean(dim=1), torch.ones(2))
    assert att[0, 63, A["row"]] == 1 and att[0, 63, A["col"]] == 1


def test_stage_out_of_range():
    with pytest.raises(ValueError, match="stage"):
        features(torch.randn(1, 2, 3), torch.rand(1, 2), torch.ones(1, 2, dtype=torch.bool), stage=3)


def test_suppression_singles_out_the_less_attended_of_each_near_duplicate_pair():
    """In one shot: the less attended member of a near-duplicate pair scores ~1, the more attended one and a
    distinct token score low, the most attended token and dead rows 0."""
    a, b, c = torch.eye(3)
    x = torch.stack([a, a + 0.05 * b, b, c, c]).unsqueeze(0)  # last token dead
    attention = torch.tensor([[0.4, 0.1, 0.2, 0.3, 0.9]])
    live = torch.tensor([[True] * 4 + [False]])
    _, sim = features(x, attention, live)
    suppression = sim[0, :, S["suppression"]]
    assert suppression[0] == 0  # the most attended live token: nothing above it
    assert suppression[1] > 0.99  # a near-copy of token 0, which the class token attends to more
    assert suppression[2] < 0.1 and suppression[3] < 0.1  # nothing similar is attended more
    assert suppression[4] == 0  # dead row
    distinct = sim[0, :, S["distinct_suppression"]]  # ranked by distinctiveness instead of attention
    assert distinct[1] > 0.99 and distinct[0] < 0.1  # token 1 leans towards token 2: the less distinctive
    assert distinct[4] == 0
