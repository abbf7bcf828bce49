"""The states the headroom benchmarks search from: a split's images run once to the first pruning point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from envs.problem import PruningProblem
from envs.vit.backbone_checkpoint import normalize
from envs.vit.held_out import load_checked_split
from envs.vit.pruned_forward import TokenState, initial_state
from envs.vit.staged_vit import StagedViT


@torch.no_grad()
def first_stage_states(staged: StagedViT, config: dict[str, Any], problem: PruningProblem, data_dir: str | Path,
                       split: str, limit: int, batch_size: int = 256
                       ) -> tuple[list[TokenState], torch.Tensor, torch.Tensor]:
    """``limit`` images of ``split`` (``problem``'s data set and split seed; refused as train.py and evaluate.py
    refuse images the backbone cannot score honestly: ``load_checked_split``) at the first pruning point, in
    batches of ``batch_size``; their unpruned log-probabilities ``[n, C]`` (the rest of the forward from
    those states, not run again); and their labels ``[n]``."""
    data = load_checked_split(problem.dataset, split, data_dir, config, val_size=problem.val_size,
                              seed=problem.split_seed, limit=limit)
    states = [initial_state(staged, normalize(data.images[start:start + batch_size], config))
              for start in range(0, len(data.labels), batch_size)]
    unpruned = torch.cat([staged.forward_from(state.tokens, 1).log_softmax(-1) for state in states])
    return states, unpruned, data.labels
