"""The committed reference backbone and policy: they load, fit together, and reproduce their card."""

import json
import math
import shutil

import pytest
import torch

from envs.vit.backbone_checkpoint import REFERENCE_BACKBONE, load_backbone, normalize
from envs.vit.data import load_split
from envs.vit.staged_vit import StagedViT
from policies import checkpoints, export
from policies.checkpoints import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    check_policies,
    load_exported_policies,
    load_policies,
    load_rllib_policies,
)

REFERENCE_POLICIES = [REFERENCE_BACKBONE.parent / "marl_policy", REFERENCE_BACKBONE.parent / "marl_policy_six_points"]


SAMPLE = 500  # the full split takes minutes on a CPU; evaluate.py's Baseline row reads all of it


def test_reference_backbone_agrees_with_its_card_on_a_sample(data_dir):
    """A seeded sample of the test split scores the card's accuracy within 3 binomial standard errors
    (about 4.6 points at 500 images): broken weights or preprocessing land far outside (without the card's mean
    and std, 32 points below; channels in BGR order, 21; mean and std 0.5, 6)."""
    model, config = load_backbone(REFERENCE_BACKBONE)
    test = load_split(config["dataset"], "test", data_dir, input_size=config["input_size"], limit=SAMPLE)
    with torch.inference_mode():
        correct = sum((model(normalize(test.images[start:start + 500], config)).argmax(1)
                       == test.labels[start:start + 500]).sum().item() for start in range(0, SAMPLE, 500))
    card = config["test_accuracy"]
    assert abs(correct / SAMPLE - card) <= 3 * math.sqrt(card * (1 - card) / SAMPLE)


@pytest.mark.parametrize("policy", REFERENCE_POLICIES, ids=lambda path: path.name)
def test_reference_policy_fits_the_reference_backbone(policy):
    modules, info = load_policies(policy)
    assert info.problem.backbone_path == REFERENCE_BACKBONE and info.problem.reduction == "merge"
    model, _ = load_backbone(REFERENCE_BACKBONE)
    check_policies(modules, StagedViT(model, info.problem.prune_points).num_patches, policy)
    assert json.loads((REFERENCE_BACKBONE / "config.json").read_text())["model_name"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize("policy", REFERENCE_POLICIES, ids=lambda path: path.name)
def test_reference_policy_export_holds_its_rllib_modules(policy):
    """What inference loads is what was trained; after retraining: python -m policies.export reference/marl_policy."""
    exported, info = load_exported_policies(policy)
    modules, rllib_info = load_rllib_policies(policy)
    assert info == rllib_info and exported.keys() == modules.keys()
    for name, module in modules.items():
        state = exported[name].state_dict()
        assert state.keys() == module.state_dict().keys()
        assert all(torch.equal(state[key], value) for key, value in module.state_dict().items())


@pytest.mark.parametrize("policy", REFERENCE_POLICIES, ids=lambda path: path.name)
def test_exporting_a_reference_policy_again_leaves_its_export_byte_identical(policy, tmp_path, monkeypatch, capsys):
    """python -m policies.export rewrote the committed policy.json with the fields its pruning_config.json predates
    (train_ratios, warm_start_steps, commit, backbone_digest), as the loader defaults them, and with the packages'
    versions of the environment it ran in: the committed export is what the export writes, and the versions are
    the record's, whatever exports it again."""
    copy = tmp_path / policy.name
    shutil.copytree(policy, copy)
    monkeypatch.setattr(checkpoints, "versions_line", lambda: "torch 0.0.0 (another environment)")
    assert export.main([str(copy)]) == 0
    assert capsys.readouterr().out == f"wrote {copy / 'export'}\n"
    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        assert (copy / "export" / name).read_bytes() == (policy / "export" / name).read_bytes(), name
