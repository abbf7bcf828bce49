"""Warm start: before PPO, the similarity agent imitates a heuristic's removals (behaviour cloning).

PPO pays one shared reward per image for ~64 per-token decisions, so per-token preferences emerge slowly
(docs/DESIGN.md). Imitation gives the similarity agent the best heuristic's behaviour to start from, on
train-split images only; the attention agent starts keeping almost every token
(``policies.decisions.KEEP_PROBABILITY``), so at the start the pair removes what the heuristic removes, and
PPO then trains both agents from there. ``nms`` (attention NMS) is what the similarity agent's one-shot
``suppression`` feature encodes, so it is imitated almost exactly; ``greedy`` (greedy similarity) is not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from envs.vit.features import observe
from envs.vit.pruned_forward import TokenState, exact_forward
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import pad_tokens
from policies.heuristics import heuristic_selector
from policies.rl_module import policy_module_spec

IMITATION_CONFIDENCE = 0.95  # cloning targets: 0.95 redundant / 0.05 not, so logits stay near +-3
IMITATION_STEPS = 400
IMITATION_BATCH = 128
IMITATION_LR = 3e-3


@torch.no_grad()
def imitation_data(staged: StagedViT, images: torch.Tensor, target_ratio: float, reduction: str, heuristic: str,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The similarity agent's observations along the ``heuristic``'s pruned forwards, and the heuristic's choice.

    Args:
        images: normalised ``[M, C, H, W]``.

    Returns:
        ``features [R, N, F]``, ``live [R, N]`` and ``redundant [R, N]`` (1 = the heuristic removes it), one row per
        image and pruning point, live tokens first and zero-padded to ``N`` as in the env.
    """
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    select = heuristic_selector(heuristic)

    def record(state: TokenState, k: int) -> torch.Tensor:
        keep = select(state, k)
        features = observe(staged, state, target_ratio).similarity
        rows.append((features, state.live.float(), (~keep & state.live).float()))
        return keep

    for start in range(0, len(images), batch_size):
        exact_forward(staged, images[start:start + batch_size], record, target_ratio, reduction)
    features, live, redundant = (torch.cat([pad_tokens(row[i], staged.num_patches) for row in rows])
                                 for i in range(3))
    return features, live, redundant


def warm_start_similarity(staged: StagedViT, images: torch.Tensor, target_ratio: float, reduction: str,
                          heuristic: str, model_config: dict, directory: Path,
                          seed: int = 0) -> tuple[Path, float]:
    """Fit a similarity module to the ``heuristic`` on ``images`` (normalised) and save it in ``directory``.

    Returns its path (``RLModule.save_to_path``) and the agreement :func:`clone_similarity` reports.
    """
    features, live, redundant = imitation_data(staged, images, target_ratio, reduction, heuristic)
    torch.manual_seed(seed)
    module = policy_module_spec("similarity", staged.num_patches, model_config).build()
    agreement = clone_similarity(module, features, live, redundant, seed=seed)
    path = Path(directory) / "similarity"
    module.save_to_path(str(path))
    return path, agreement


def clone_similarity(module: RLModule, features: torch.Tensor, live: torch.Tensor, redundant: torch.Tensor,
                     steps: int = IMITATION_STEPS, batch_size: int = IMITATION_BATCH, lr: float = IMITATION_LR,
                     seed: int = 0) -> float:
    """Fit the module's per-token logits to ``redundant`` (binary cross-entropy on live tokens, Adam).

    The targets are smoothed to ``IMITATION_CONFIDENCE`` so the clone's logits stay moderate and PPO can move
    it gradually (docs/DESIGN.md, "Warm start"). Returns the fraction of live tokens whose thresholded
    decision matches the heuristic afterwards.
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
