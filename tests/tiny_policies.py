"""Tiny policy checkpoints for the tests: modules of the real policy class on the tiny backbone of conftest,
calibrated so their decisions vary as a trained policy's do, in the layout train.py writes; and a scripted agent
for tests that step envs without a policy (:func:`first_live`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.problem import POLICIES, PruningProblem
from envs.vit.features import ATTENTION_FEATURES, SIMILARITY_FEATURES, observe
from envs.vit.pruned_forward import initial_state
from envs.vit.staged_vit import StagedViT
from policies.checkpoints import MODULES_DIR, PRUNING_CONFIG
from policies.rl_module import TokenPolicyModule, policy_module_spec

PRUNE_POINTS = (1, 2, 3)  # the tiny backbone has 4 blocks
NUM_PATCHES = 64
HIDDEN = 16
TARGET_RATIO = 0.5
FEATURE_COUNTS = {"attention": len(ATTENTION_FEATURES), "similarity": len(SIMILARITY_FEATURES)}


def build_module(name: str, num_patches: int = NUM_PATCHES, seed: int = 0) -> TokenPolicyModule:
    torch.manual_seed(seed)
    return policy_module_spec(name, num_patches, {"hidden": HIDDEN}).build()


def calibrate(module, name: str, staged: StagedViT) -> None:
    """Rescale the last layer so that scores at the first pruning point of random images have unit spread:
    choices then vary from token to token and image to image, as after training (a fresh module gives nearly
    the same score to every token)."""
    with torch.no_grad():
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        state = initial_state(staged, images)
        scores = module.token_scores(getattr(observe(staged, state, TARGET_RATIO), name), state.live.float())
        module._logit_net[-1].weight.div_(scores.std())


def write_checkpoint(directory: Path, backbone: Path, *, num_patches: int = NUM_PATCHES, agents: str = "both",
                     prune_points=PRUNE_POINTS, target_ratio: float = TARGET_RATIO,
                     calibrate_on: StagedViT | None = None, reduction: str = "merge",
                     legacy: bool = False, **problem: Any) -> Path:
    """The layout train.py writes: the RLlib checkpoint's modules plus pruning_config.json (``legacy``: in the
    layout before the problem was one JSON object, with no reduction named); ``problem``: more settings of the
    problem."""
    for seed, name in enumerate(POLICIES):
        if agents in ("both", name):
            module = build_module(name, num_patches, seed)
            if calibrate_on is not None:
                calibrate(module, name, calibrate_on)
            module.save_to_path(directory / MODULES_DIR / name)
    if legacy:
        config = {"server": {"backbone": str(backbone), "dataset": "cifar10", "data_dir": "data",
                             "prune_points": list(prune_points), "target_ratio": target_ratio},
                  "env": {"agents": agents}, "model_config": {"hidden": HIDDEN}, "iteration": 3}
    else:
        settings = {**PruningProblem(backbone=str(backbone), prune_points=tuple(prune_points), agents=agents,
                                     hidden=HIDDEN, **problem).to_json(), "target_ratio": target_ratio,
                    "reduction": reduction}
        config = {"problem": settings, "iteration": 3}
    (directory / PRUNING_CONFIG).write_text(json.dumps(config))
    return directory


def first_live(obs: dict) -> np.ndarray:
    """An agent's choice that needs no policy: the first ``count`` tokens it may choose from, an exact-size set as
    the policies sample."""
    chosen = np.zeros(len(obs["live"]), dtype=np.int8)
    chosen[np.flatnonzero(obs["live"])[:int(obs["count"][0])]] = 1
    return chosen
