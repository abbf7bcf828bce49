"""Warm start: the imitation data are the greedy heuristic's decisions, cloning fits them, and train.py
starts PPO from the cloned similarity module."""

from __future__ import annotations

import timm
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec

from envs.vit.features import ATTENTION_FEATURES, SIMILARITY_FEATURES
from envs.vit.staged_vit import StagedViT
from policies.checkpoints import latest_checkpoint, module_path, read_checkpoint_info
from policies.decisions import KEEP_PROBABILITY
from policies.rl_module import TokenPolicyModule, agent_spaces
from policies.warm_start import clone_similarity, imitation_data
from tests.test_train import run

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


def test_train_starts_ppo_from_the_cloned_module(tmp_path, tiny_backbone, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path, tiny_backbone, data_dir, "--iterations", "1", "--num-workers", "0", "--lr", "1e-9",
               "--warm-start", "nms") == 0
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert read_checkpoint_info(checkpoint).problem.warm_start == "nms"
    cloned = RLModule.from_checkpoint(str(checkpoint.parent / "warm_start" / "similarity"))
    trained = RLModule.from_checkpoint(str(module_path(checkpoint, "similarity")))
    for name, value in cloned.state_dict().items():  # lr 1e-9: PPO's one step leaves the clone as it was
        torch.testing.assert_close(trained.state_dict()[name], value, atol=1e-5, rtol=0)
    attention = RLModule.from_checkpoint(str(module_path(checkpoint, "attention")))
    obs = {"tokens": torch.zeros(1, 64, len(ATTENTION_FEATURES)), "live": torch.ones(1, 64)}
    keep = attention.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS].sigmoid()
    torch.testing.assert_close(keep, torch.full_like(keep, KEEP_PROBABILITY), atol=0.02, rtol=0)
