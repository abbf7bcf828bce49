"""Warm start: before PPO, the similarity agent imitates greedy similarity removal (behaviour cloning).

PPO pays one shared reward per image for ~64 per-token decisions, so per-token preferences emerge slowly
(docs/DESIGN.md). Imitation gives the similarity agent the best heuristic's behaviour to start from, on
train-split images only; the attention agent starts keeping almost every token (``KEEP_PROBABILITY``), so
at the start the pair removes what greedy similarity removes, and PPO then trains both agents from there.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec

from envs.features import SIMILARITY_FEATURES, token_features
from envs.pruned_forward import PruneContext, pruned_forward
from envs.pruning_env import agent_spaces
from envs.staged_vit import StagedViT
from policies.heuristics import greedy_similarity_keep
from policies.rl_module import TokenPolicyModule

WARM_STARTS: tuple[str, ...] = ("none", "greedy")
KEEP_PROBABILITY = 0.95  # the attention agent's initial keep probability under a warm start
IMITATION_CONFIDENCE = 0.95  # cloning targets: 0.95 redundant / 0.05 not, so logits stay near +-3
IMITATION_IMAGES = 2048
IMITATION_STEPS = 400
IMITATION_BATCH = 128
IMITATION_LR = 3e-3


@torch.no_grad()
def imitation_data(staged: StagedViT, images: torch.Tensor, target_ratio: float, reduction: str,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The similarity agent's observations along greedy-similarity pruned forwards, and the heuristic's choice.

    Args:
        images: normalised ``[M, C, H, W]``.

    Returns:
        ``features [R, N, F]``, ``live [R, N]`` and ``redundant [R, N]`` (1 = greedy removes it), one row per
        image and pruning point, live tokens first and zero-padded to ``N`` as in the env.
    """
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    num_points = len(staged.prune_points)

    def record(ctx: PruneContext) -> torch.Tensor:
        _, features = token_features(ctx.x_patch, ctx.cls_attention, ctx.live, ctx.positions, staged.grid_size,
                                     ctx.stage, num_points, 1.0 - target_ratio)
        keep_index = greedy_similarity_keep(ctx.x_patch, ctx.live, ctx.k)
        redundant = torch.ones_like(ctx.live, dtype=torch.float32).scatter(1, keep_index, 0.0)
        rows.append((features, ctx.live.float(), redundant))
        return keep_index

    for start in range(0, len(images), batch_size):
        pruned_forward(staged, images[start:start + batch_size], record, target_ratio, reduction)
    features, live, redundant = (torch.cat([_pad_tokens(row[i], staged.num_patches) for row in rows])
                                 for i in range(3))
    return features, live, redundant


def _pad_tokens(t: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[B, n, ...]`` zero-padded along the token axis to ``num_patches``."""
    extra = num_patches - t.shape[1]
    return F.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))


def warm_start_similarity(staged: StagedViT, images: torch.Tensor, target_ratio: float, reduction: str,
                          model_config: dict, directory: Path, seed: int = 0) -> tuple[Path, float]:
    """Fit a similarity module to greedy similarity on ``images`` (normalised) and save it in ``directory``.

    Returns its path (``RLModule.save_to_path``) and the agreement :func:`clone_similarity` reports.
    """
    features, live, redundant = imitation_data(staged, images, target_ratio, reduction)
    observation, action = agent_spaces(staged.num_patches, len(SIMILARITY_FEATURES))
    torch.manual_seed(seed)
    module = RLModuleSpec(module_class=TokenPolicyModule, observation_space=observation, action_space=action,
                          model_config=model_config).build()
    agreement = clone_similarity(module, features, live, redundant, seed=seed)
    path = Path(directory) / "similarity"
    module.save_to_path(str(path))
    return path, agreement


def clone_similarity(module: RLModule, features: torch.Tensor, live: torch.Tensor, redundant: torch.Tensor,
                     steps: int = IMITATION_STEPS, batch_size: int = IMITATION_BATCH, lr: float = IMITATION_LR,
                     seed: int = 0) -> float:
    """Fit the module's per-token logits to ``redundant`` (binary cross-entropy on live tokens, Adam).

    The targets are smoothed to ``IMITATION_CONFIDENCE``: on hard 0/1 targets the separable data drive the
    logits to +-80, and PPO's first small weight changes then flip whole images to "all redundant"; at +-3
    the clone still explores and PPO moves it gradually. Returns the fraction of live tokens whose
    thresholded decision matches the heuristic afterwards.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(steps):
        rows = torch.randint(0, len(features), (batch_size,), generator=generator)
        obs = {"tokens": features[rows], "live": live[rows]}
        logits = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        target = redundant[rows] * (2 * IMITATION_CONFIDENCE - 1) + (1 - IMITATION_CONFIDENCE)
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=live[rows], reduction="sum")
        optimizer.zero_grad()
        (loss / live[rows].sum()).backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: {"tokens": features, "live": live}})[
            Columns.ACTION_DIST_INPUTS]
    agree = ((logits > 0).float() == redundant).float() * live
    return float(agree.sum() / live.sum())
