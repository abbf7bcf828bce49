"""The committed reference backbone and policy: they load, fit together, and reproduce their card."""

import json

import pytest
import torch

from envs.backbone_checkpoint import REFERENCE_BACKBONE, load_backbone, normalize
from envs.data import load_split
from envs.staged_vit import StagedViT
from policies.checkpoints import check_policies, load_policies

REFERENCE_POLICY = REFERENCE_BACKBONE.parent / "marl_policy"


@pytest.mark.slow
def test_reference_backbone_reproduces_its_card(data_dir):
    model, config = load_backbone(REFERENCE_BACKBONE)
    test = load_split(config["dataset"], "test", data_dir, input_size=config["input_size"])
    assert len(test) == config["split_sizes"]["test"]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test), 500):
            logits = model(normalize(test.images[start:start + 500], config))
            correct += (logits.argmax(1) == test.labels[start:start + 500]).sum().item()
    assert abs(100 * correct / len(test) - 100 * config["test_accuracy"]) <= 0.2


def test_reference_policy_fits_the_reference_backbone():
    if not REFERENCE_POLICY.exists():
        pytest.skip("no committed policy yet")
    modules, pruning = load_policies(REFERENCE_POLICY)
    model, _ = load_backbone(REFERENCE_BACKBONE)
    check_policies(modules, StagedViT(model, pruning["server"]["prune_points"]).num_patches, REFERENCE_POLICY)
    assert json.loads((REFERENCE_BACKBONE / "config.json").read_text())["model_name"] == "vit_tiny_patch16_224"
