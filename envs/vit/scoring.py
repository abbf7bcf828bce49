"""How the answers of a pruned model are scored, in percent: against the labels (accuracy) and against the unpruned
model's answers (agreement). train.py's validation (``envs.pruning_engine``) and evaluate.py's table
(``evaluation``) report figures that are compared with each other, so they count them with one function."""

from __future__ import annotations

import torch


def percent_equal(answers: torch.Tensor, reference: torch.Tensor) -> float:
    """The percentage of positions where ``answers`` equals ``reference`` (each ``[N]``), counted in float64."""
    return 100.0 * (answers == reference).double().mean().item()
