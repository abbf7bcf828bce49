"""How the two agents' sets become the tokens that survive a pruning point.

The agents take turns at every pruning point (docs/DESIGN.md, "The two agents"). Of ``n`` live tokens the
budget keeps ``k = tokens_to_keep(n, target_ratio)``. The attention agent first *keeps* a set of exactly
``m = max(1, round(protected_share * k))`` live tokens (the problem's ``protected_share``), out of the
similarity agent's reach; the similarity agent then *removes* a set of exactly ``n - k`` of the other live
tokens as redundant. A token survives iff the
similarity agent does not remove it, so exactly ``k`` survive, the ``m`` the attention agent kept among them.
Both agents observe features computed over all ``n`` live tokens at the pruning point, and the kept tokens
stay alive, so the similarity agent's features (redundancy among the live tokens) still describe the set it
removes from. With one agent (an ablation) it decides alone: the attention agent keeps all ``k``, the
similarity agent removes all ``n - k``. :func:`turn_counts` is the split; the rule is applied here only, in
its two forms:

- to sampled sets (:func:`survives`), as the env applies the agents' actions in training;
- to the agents' scores (:func:`policy_selector`), each agent choosing its most likely set (its highest
  scores), as every evaluation and inference does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from envs.vit.features import observe
from envs.vit.pruned_forward import Selector, TokenState
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest, tokens_to_keep
from policies.token_scorer import TokenScoring

DEFAULT_PROTECTED_SHARE = 0.1
"""The default fraction of each pruning point's kept tokens that the attention agent chooses when both agents
act (docs/DESIGN.md, "The two agents", says why)."""
TURNS: tuple[str, ...] = ("attention", "similarity")
"""The order in which the agents choose at a pruning point (the order of :func:`turn_counts`' counts)."""


def turn_counts(num_live: int, target_ratio: float, agents: str, protected_share: float) -> tuple[int, int]:
    """How many of ``num_live`` tokens the attention agent keeps, and how many of the others the similarity
    agent then removes, for ``agents`` (``both``, ``attention`` or ``similarity``) to meet the budget, the
    attention agent keeping ``protected_share`` of the kept tokens (at least one) when both act."""
    keep = tokens_to_keep(num_live, target_ratio)
    kept_by_attention = {"both": max(1, round(protected_share * keep)), "attention": keep, "similarity": 0}[agents]
    return kept_by_attention, 0 if agents == "attention" else num_live - keep


def choosable(live: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """The tokens ``[N]`` bool the similarity agent may remove: the live ones the attention agent did not keep."""
    return live if kept is None else live & ~np.asarray(kept).astype(bool)


def survives(live: np.ndarray, kept: np.ndarray | None, removed: np.ndarray | None) -> np.ndarray:
    """The survivors ``[N]`` bool of sampled 0/1 sets ``[N]``: the live tokens the similarity agent did not
    remove; the attention agent's set when it acts alone (an absent agent's set is None)."""
    if removed is not None:
        return live & ~np.asarray(removed).astype(bool)
    if kept is None:
        raise ValueError("at least one agent must act")
    return np.asarray(kept).astype(bool)


def policy_selector(modules: Mapping[str, TokenScoring], staged: StagedViT, target_ratio: float,
                    protected_share: float) -> Selector:
    """Exact budget: the attention agent keeps its highest-scored tokens, then the similarity agent removes
    its highest-scored of the others (:func:`turn_counts`), each seeing what it sees in training."""
    agents = "both" if len(modules) == 2 else next(iter(modules))

    def select(state: TokenState, k: int) -> torch.Tensor:
        observation = observe(staged, state, target_ratio)
        attention_keeps, similarity_removes = turn_counts(state.live.shape[1], target_ratio, agents,
                                                          protected_share)  # every row is live (Selector)
        kept = torch.zeros_like(state.live)
        if "attention" in modules:
            scores = modules["attention"].token_scores(observation.attention, state.live.float(), every_row=True)
            kept = highest(scores, attention_keeps) & state.live
        if "similarity" not in modules:
            return kept
        left = state.live & ~kept
        scores = modules["similarity"].token_scores(observation.similarity, left.float(), every_row=True)
        return state.live & ~highest(scores, similarity_removes)
    return select
