"""How the two agents' sets become the tokens that survive a pruning point.

The agents take turns at every pruning point (docs/DESIGN.md, "The two agents"). Of the ``d`` removals the
budget asks for (``n - tokens_to_keep(n, target_ratio)`` of ``n`` live tokens), the similarity agent makes
the first ``d_s``: it marks a set of exactly ``d_s`` live tokens redundant. The attention agent then keeps
exactly ``n - d`` of the tokens left, making the other ``d_a = ATTENTION_SHARE * d`` removals. A token
survives iff the similarity agent does not mark it and the attention agent keeps it (the AND rule), so
exactly ``n - d`` survive. Both agents observe features computed over all ``n`` live tokens at the pruning
point; the similarity agent chooses first because its features (redundancy among the live tokens) would
change with the set it chooses from, while the attention agent's ranking of the tokens left does not. With
one agent (an ablation) it makes every removal. :func:`turn_counts` is the split; the rule is applied here
only, in its two forms:

- to sampled sets (:func:`survives`), as the env applies the agents' actions in training;
- to the agents' scores (:func:`policy_selector`), each agent choosing its most likely set (its highest
  scores), as every evaluation and inference does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from ray.rllib.core.rl_module.rl_module import RLModule

from envs.vit.features import observe
from envs.vit.pruned_forward import Selector, TokenState
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest, tokens_to_keep

ATTENTION_SHARE = 0.25
"""The fraction of each pruning point's removals the attention agent makes when both agents act."""
TURNS: tuple[str, ...] = ("similarity", "attention")
"""The order in which the agents choose at a pruning point (the order of :func:`turn_counts`' counts)."""


def turn_counts(num_live: int, target_ratio: float, agents: str) -> tuple[int, int]:
    """How many of ``num_live`` tokens the similarity agent marks redundant, and how many of the rest the
    attention agent then keeps, for ``agents`` (``both``, ``attention`` or ``similarity``) to meet the budget."""
    keep = tokens_to_keep(num_live, target_ratio)
    removals = num_live - keep
    by_attention = {"both": round(ATTENTION_SHARE * removals), "attention": removals, "similarity": 0}[agents]
    return removals - by_attention, keep


def survives(keep: np.ndarray | None, redundant: np.ndarray | None) -> np.ndarray:
    """The AND rule on sampled 0/1 sets ``[N]``: kept by the attention agent and not marked redundant (an
    absent agent keeps every token, marks none)."""
    if keep is None and redundant is None:
        raise ValueError("at least one agent must act")
    survive = np.ones_like(keep if keep is not None else redundant, dtype=bool)
    if keep is not None:
        survive &= np.asarray(keep).astype(bool)
    if redundant is not None:
        survive &= ~np.asarray(redundant).astype(bool)
    return survive


def policy_selector(modules: Mapping[str, RLModule], staged: StagedViT, target_ratio: float) -> Selector:
    """Exact budget: the similarity agent marks its highest-scored tokens redundant, then the attention agent
    keeps its highest-scored of the rest (:func:`turn_counts`), each seeing what it sees in training."""
    agents = "both" if len(modules) == 2 else next(iter(modules))

    def select(state: TokenState, k: int) -> torch.Tensor:
        observation = observe(staged, state, target_ratio)
        similarity_removes, attention_keeps = turn_counts(int(state.live[0].sum()), target_ratio, agents)
        keep = state.live
        if "similarity" in modules:
            scores = modules["similarity"].token_scores(observation.similarity, keep.float())
            keep = keep & ~highest(scores, similarity_removes)
        if "attention" in modules:
            scores = modules["attention"].token_scores(observation.attention, keep.float())
            keep = highest(scores, attention_keeps) & keep
        return keep
    return select
