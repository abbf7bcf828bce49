"""Warm start: the imitation data are the heuristic's decisions and cloning fits them (train.py starting PPO from
the clone: tests/test_train.py)."""

from __future__ import annotations

import timm
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from envs.vit.features import SIMILARITY_FEATURES
from envs.vit.staged_vit import StagedViT
from policies.rl_module import TokenPolicyModule, agent_spaces
from policies.warm_start import clone_similarity, imitation_data

TINY = {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 10}


def test_imitation_data_are_greedy_decisions_and_cloning_fits_them():
    torch.manual_seed(0)
    staged = StagedViT(timm.create_model("vit_tiny_patch16_224", **TINY).eval(), (1, 2, 3))
    features, live, redundant = imitation_data(staged, torch.randn(6, 3, 32, 32), 0.5, "merge", "nms", batch_size=4)
    assert features.shape == (18, 64, len(SIMILARITY_FEATURES))  # 6 images x 3 pruning points
    assert live.sum(1).tolist() == [64] * 4 + [32] * 4 + [16] * 4 + [64] * 2 + [32] * 2 + [16] * 2
    assert (redundant * live).sum(1).tolist() == [32] * 4 + [16] * 4 + [8] * 4 + [32] * 2 + [16] * 2 + [8] * 2
    assert (redundant[live == 0] == 0).all() and (features[live == 0] == 0).all()
    suppressed = features[..., SIMILARITY_FEATURES.index("suppression")]
    for row in range(len(live)):  # attention NMS removes the most suppressed tokens: the feature encodes it
        removed, kept = suppressed[row][redundant[row].bool()], suppressed[row][(live - redundant)[row].bool()]
        assert removed.min() >= kept.max()

    observation, action = agent_spaces(64, len(SIMILARITY_FEATURES))
    module = RLModuleSpec(module_class=TokenPolicyModule, observation_space=observation, action_space=action,
                          model_config={"hidden": 16}).build()
    before = clone_similarity(module, features, live, redundant, steps=0)
    after = clone_similarity(module, features, live, redundant, steps=150, batch_size=8, lr=1e-2)
    assert before < 0.7 < 0.95 <= after
