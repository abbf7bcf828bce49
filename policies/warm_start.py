"""Warm start: before PPO, the agents imitate a pair of heuristics (behaviour cloning).

PPO pays one shared reward per image for sets of dozens of tokens, so per-token preferences emerge slowly
(docs/DESIGN.md). Imitation gives the agents a strong start, on train-split images only: at each pruning
point the attention agent imitates greedy attention for its share of the kept tokens (those the class token
attends to most; ``policies.decisions`` splits the turns), and the similarity agent imitates the chosen
heuristic's removals among the other tokens (in the heuristic's removal order, ``policies.heuristics.redundancy``).
``nms`` (attention NMS) and ``distinct`` (distinctive NMS) are what the similarity agent's one-shot
``suppression`` and ``distinct_suppression`` features encode, so they are imitated almost exactly;
``similarity`` (greedy similarity, sequential) is approximated. PPO then trains both agents from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from ray.rllib.core.rl_module.rl_module import RLModule

from envs.vit.features import observe
from envs.vit.pruned_forward import Selector, TokenState, exact_forward
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest, pad_tokens
from policies.decisions import Turns, take_turns, trained_policies
from policies.heuristics import greedy_attention_keep, redundancy
from policies.rl_module import policy_module_spec

IMITATION_CONFIDENCE = 0.95  # cloning targets: 0.95 chosen / 0.05 not, so scores stay near +-3
IMITATION_BATCH = 128
IMITATION_LR = 3e-3


Demonstration = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per acting policy: ``features [R, N, F]``, ``live [R, N]`` and ``chosen [R, N]``, one row per image and
pruning point: what the agent observes, the tokens it chooses from, and the set the heuristic chose (the
attention agent's kept tokens, the similarity agent's redundant ones), zero-padded to ``N`` rows as in the env."""


@torch.no_grad()
def imitation_data(staged: StagedViT, images: torch.Tensor, ratios: Sequence[float], reduction: str, heuristic: str,
                   agents: str, protected_share: float, batch_size: int = 256) -> Demonstration:
    """The agents' observations along the heuristics' pruned forwards of ``images`` (normalised
    ``[M, C, H, W]``), and the heuristics' choices. The images are dealt out among the removal ``ratios`` in
    turn (image ``i`` at ``ratios[i % len(ratios)]``), so the agents imitate the heuristics at every ratio they
    will be trained at; the rows come ratio by ratio."""
    rows: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for i, ratio in enumerate(ratios):
        record = _recorder(staged, ratio, heuristic, agents, protected_share, rows)
        dealt = images[i::len(ratios)]
        for start in range(0, len(dealt), batch_size):
            exact_forward(staged, dealt[start:start + batch_size], record, ratio, reduction)
    return {policy: tuple(torch.cat([pad_tokens(row[i].float(), staged.num_patches) for row in policy_rows])
                          for i in range(3))
            for policy, policy_rows in rows.items()}


def heuristic_turns(state: TokenState, target_ratio: float, removal_scores: Callable[[TokenState], torch.Tensor],
                    agents: str, protected_share: float) -> Turns:
    """Heuristics taking the agents' turns at one pruning point (:func:`policies.decisions.take_turns`):
    greedy attention keeps the attention agent's share, then the highest ``removal_scores(state) [B, W]`` of the
    other tokens are removed. ``agents``: which agents have a turn."""
    acting = trained_policies(agents)
    keep_by_attention = None if "attention" not in acting else (
        lambda tokens, count: greedy_attention_keep(state.cls_attention, tokens, count))
    remove_by_similarity = None if "similarity" not in acting else (
        lambda tokens, count: highest(removal_scores(state), count, tokens))
    return take_turns(state.live, target_ratio, protected_share, keep_by_attention, remove_by_similarity)


def _recorder(staged: StagedViT, target_ratio: float, heuristic: str, agents: str, protected_share: float,
              rows: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]) -> Selector:
    """A selector that makes the heuristics' choices at ``target_ratio`` and appends, per policy, what the agent
    observes, the tokens it chooses from and the heuristic's set to ``rows``."""

    def record(state: TokenState, k: int) -> torch.Tensor:
        turns = heuristic_turns(state, target_ratio, partial(redundancy, heuristic), agents, protected_share)
        observation = observe(staged, state, target_ratio)
        if turns.kept is not None:
            rows.setdefault("attention", []).append((observation.attention, state.live, turns.kept))
        if turns.removed is not None:
            rows.setdefault("similarity", []).append((observation.similarity, turns.left, turns.removed))
        return turns.survivors
    return record


def imitated_selector(target_ratio: float, heuristic: str, agents: str, protected_share: float) -> Selector:
    """The choices the warm start imitates at ``target_ratio``: the heuristics taking the agents' turns (greedy
    attention keeps its share, ``heuristic`` removes among the rest), without the agents' features."""
    return lambda state, k: heuristic_turns(state, target_ratio, partial(redundancy, heuristic), agents,
                                            protected_share).survivors


def warm_start_modules(staged: StagedViT, images: torch.Tensor, ratios: Sequence[float], reduction: str,
                       heuristic: str, agents: str, protected_share: float, model_config: dict, steps: int,
                       directory: Path, seed: int = 0) -> dict[str, tuple[Path, float]]:
    """Fit each acting agent's module to its heuristic on ``images`` (normalised) in ``steps`` Adam steps and save
    it in ``directory``, at the removal ``ratios`` the agents will be trained at (:func:`imitation_data`).

    Returns, per policy, its path (``RLModule.save_to_path``) and the agreement :func:`clone_module` reports.
    """
    demonstration = imitation_data(staged, images, ratios, reduction, heuristic, agents, protected_share)
    out = {}
    for policy, (features, live, chosen) in demonstration.items():
        torch.manual_seed(seed)
        module = policy_module_spec(policy, staged.num_patches, model_config).build()
        agreement = clone_module(module, features, live, chosen, steps, seed=seed)
        path = Path(directory) / policy
        module.save_to_path(str(path))
        out[policy] = (path, agreement)
    return out


def clone_module(module: RLModule, features: torch.Tensor, live: torch.Tensor, chosen: torch.Tensor,
                 steps: int, seed: int = 0) -> float:
    """Fit the module's token scores to ``chosen`` (binary cross-entropy on live tokens, Adam at
    :data:`IMITATION_LR` on :data:`IMITATION_BATCH` rows drawn with ``seed`` a step): the chosen tokens score high,
    so the module's most likely set of that size is the heuristic's. The targets are smoothed to
    ``IMITATION_CONFIDENCE`` so the scores stay moderate and PPO's sampled sets still explore (docs/DESIGN.md,
    "Warm start").

    Returns the fraction of the chosen tokens that the module's most likely sets contain afterwards.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=IMITATION_LR)
    module.train()
    for _ in range(steps):
        rows = torch.randint(0, len(features), (IMITATION_BATCH,), generator=generator)
        scores = module.token_scores(features[rows], live[rows])
        target = chosen[rows] * (2 * IMITATION_CONFIDENCE - 1) + (1 - IMITATION_CONFIDENCE)
        loss = F.binary_cross_entropy_with_logits(scores, target, weight=live[rows], reduction="sum")
        optimizer.zero_grad()
        (loss / live[rows].sum()).backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        scores = module.token_scores(features, live)
    count = chosen.sum(dim=1, keepdim=True)
    matched = (highest(scores, count) & chosen.bool()).sum()
    return float(matched / count.sum().clamp_min(1))
