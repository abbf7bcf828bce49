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
similarity agent removes all ``n - k``. :func:`turn_counts` is the split; :func:`choosable` and :func:`survives`
are the rule, the one place it is written, on bool masks of either kind:

- numpy masks of sampled sets, as the env applies the agents' actions in training;
- tensors of chosen sets (:func:`take_turns`): the agents' most likely sets (their highest scores,
  :func:`policy_selector`), as every evaluation and inference does, or the heuristics the warm start imitates
  (``policies.warm_start``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

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
POLICIES: tuple[str, ...] = ("attention", "similarity")
"""The agents' policy IDs, in the order in which they choose at a pruning point (that of :func:`turn_counts`'
counts)."""


def trained_policies(agents: str) -> tuple[str, ...]:
    """The policies an ``agents`` mode trains: both, or the one it names."""
    return POLICIES if agents == "both" else (agents,)


def turn_counts(num_live: int, target_ratio: float, agents: str, protected_share: float) -> tuple[int, int]:
    """How many of ``num_live`` tokens the attention agent keeps, and how many of the others the similarity
    agent then removes, for ``agents`` (``both``, ``attention`` or ``similarity``) to meet the budget, the
    attention agent keeping ``protected_share`` of the kept tokens (at least one) when both act."""
    keep = tokens_to_keep(num_live, target_ratio)
    kept_by_attention = {"both": max(1, round(protected_share * keep)), "attention": keep, "similarity": 0}[agents]
    return kept_by_attention, 0 if agents == "attention" else num_live - keep


Mask = TypeVar("Mask", np.ndarray, torch.Tensor)
"""Bool token masks of one shape, ``[N]`` or ``[B, W]``: numpy where the env applies sampled sets, torch in
:func:`take_turns`."""


def choosable(live: Mask, kept: Mask | None) -> Mask:
    """The tokens the similarity agent may remove: the live ones the attention agent did not keep (all bool
    masks, ``kept`` None where the attention agent has no turn)."""
    return live if kept is None else live & ~kept


def survives(live: Mask, kept: Mask | None, removed: Mask | None) -> Mask:
    """The survivors of the agents' sets (bool masks): the live tokens the similarity agent did not remove; the
    attention agent's set when it acts alone (an absent agent's set is None)."""
    if removed is not None:
        return live & ~removed
    if kept is None:
        raise ValueError("at least one agent must act")
    return kept


TurnRule = Callable[[torch.Tensor, int], torch.Tensor]
"""``(tokens [B, W] bool, count)`` -> the ``count`` of ``tokens`` an agent chooses, ``[B, W]`` bool."""


class Turns(NamedTuple):
    """One pruning point's turns, each ``[B, W]`` bool."""

    survivors: torch.Tensor
    kept: torch.Tensor | None
    """The attention agent's set; None where it has no turn."""
    left: torch.Tensor
    """The tokens the similarity agent chooses from: the live ones the attention agent did not keep."""
    removed: torch.Tensor | None
    """The similarity agent's set; None where it has no turn or the budget removes nothing."""


def take_turns(live: torch.Tensor, target_ratio: float, protected_share: float, keep_by_attention: TurnRule | None,
               remove_by_similarity: TurnRule | None) -> Turns:
    """The agents' turns at one pruning point of an exact budget (every row of ``live [B, W]`` is live,
    ``envs.vit.pruned_forward.Selector``): ``keep_by_attention`` chooses the tokens the attention agent keeps,
    then ``remove_by_similarity`` those the similarity agent removes among the others (:func:`turn_counts`);
    an absent agent's rule is None."""
    agents = "both" if keep_by_attention and remove_by_similarity else (
        "attention" if keep_by_attention else "similarity")
    attention_keeps, similarity_removes = turn_counts(live.shape[1], target_ratio, agents, protected_share)
    kept = None if keep_by_attention is None else keep_by_attention(live, attention_keeps) & live
    left = choosable(live, kept)
    if remove_by_similarity is None:
        return Turns(survives(live, kept, None), kept, left, None)
    if not similarity_removes:  # the similarity agent's turn removes nothing: every live token survives
        return Turns(survives(live, kept, torch.zeros_like(left)), kept, left, None)
    removed = remove_by_similarity(left, similarity_removes) & left
    return Turns(survives(live, kept, removed), kept, left, removed)


def policy_selector(modules: Mapping[str, TokenScoring], staged: StagedViT, target_ratio: float,
                    protected_share: float) -> Selector:
    """Exact budget: the attention agent keeps its highest-scored tokens, then the similarity agent removes
    its highest-scored of the others (:func:`turn_counts`), each seeing what it sees in training."""
    def select(state: TokenState, k: int) -> torch.Tensor:
        observation = observe(staged, state, target_ratio)

        def most_likely_set(policy: str) -> TurnRule:
            features = getattr(observation, policy)
            return lambda tokens, count: highest(modules[policy].token_scores(features, tokens.float(),
                                                                              every_row=True), count)

        rules = [most_likely_set(policy) if policy in modules else None for policy in POLICIES]
        return take_turns(state.live, target_ratio, protected_share, *rules).survivors
    return select
