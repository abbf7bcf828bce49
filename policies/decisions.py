"""How the agents' outputs become the tokens that survive a pruning point.

The AND rule (docs/DESIGN.md, "The two agents"): a token survives iff the attention agent keeps it and the
similarity agent does not call it redundant. It is applied here only, in its two forms:

- to sampled decisions (:func:`survives`), as the env applies the agents' actions in training;
- to probabilities (:func:`survival_log_probability`), ``log(p_keep * (1 - p_redundant))``, which ranks
  the tokens for the two deterministic evaluation modes: the top ``tokens_to_keep`` (:func:`policy_selector`,
  exact budget) or each image's expected number of survivors (:func:`policy_keep_rule`, adaptive).

With one agent (an ablation) only its factor is used. :func:`initial_logit_bias` sets where the policies
start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from envs.vit.features import observe
from envs.vit.pruned_forward import KeepRule, Selector, TokenState
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import topk_keep_mask

KEEP_PROBABILITY = 0.95  # the attention agent's initial keep probability under a warm start


def survives(keep: np.ndarray | None, redundant: np.ndarray | None) -> np.ndarray:
    """The AND rule on sampled 0/1 decisions ``[N]``: kept by the attention agent and not redundant."""
    if keep is None and redundant is None:
        raise ValueError("at least one agent must act")
    survive = np.ones_like(keep if keep is not None else redundant, dtype=bool)
    if keep is not None:
        survive &= np.asarray(keep).astype(bool)
    if redundant is not None:
        survive &= ~np.asarray(redundant).astype(bool)
    return survive


def survival_log_probability(logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The AND rule on probabilities: ``log(p_keep * (1 - p_redundant))`` from each agent's logits ``[B, W]``.

    Logs of sigmoids rank like the product but do not saturate into ties.
    """
    score = 0.0
    if "attention" in logits:
        score = score + F.logsigmoid(logits["attention"])
    if "similarity" in logits:
        score = score + F.logsigmoid(-logits["similarity"])
    return score


def agent_logits(modules: Mapping[str, RLModule], staged: StagedViT, state: TokenState,
                 target_ratio: float) -> dict[str, torch.Tensor]:
    """Each module's per-token logits ``[B, W]`` on the observation of ``state`` (rows cut to the state's
    width: the module treats tokens independently apart from a mean over live rows, so padding to ``N``
    rows would change nothing)."""
    observation = observe(staged, state, target_ratio)
    live = observation.live.float()
    return {name: module.forward_inference({Columns.OBS: {"tokens": observation.features(name), "live": live}})[
        Columns.ACTION_DIST_INPUTS] for name, module in modules.items()}


def policy_selector(modules: Mapping[str, RLModule], staged: StagedViT, target_ratio: float) -> Selector:
    """Exact budget: the ``k`` tokens most likely to survive under the AND rule."""
    def select(state: TokenState, k: int) -> torch.Tensor:
        score = survival_log_probability(agent_logits(modules, staged, state, target_ratio))
        return topk_keep_mask(score, state.live, k)
    return select


def policy_keep_rule(modules: Mapping[str, RLModule], staged: StagedViT, target_ratio: float) -> KeepRule:
    """Adaptive budget: each image keeps its expected number of survivors, the most likely ones.

    The agents were trained sampling independent Bernoulli decisions, so an image's own budget is the
    expected survivor count ``round(sum p_keep * (1 - p_redundant))`` over its live tokens (at least 1);
    thresholding each probability at 0.5 instead would describe a policy that was never trained.
    """
    def decide(state: TokenState) -> torch.Tensor:
        score = survival_log_probability(agent_logits(modules, staged, state, target_ratio))
        score = score.masked_fill(~state.live, float("-inf"))
        count = score.exp().sum(dim=1).round().clamp(min=1).long()
        rank = score.argsort(dim=1, descending=True).argsort(dim=1)
        return (rank < count[:, None]) & state.live
    return decide


def initial_logit_bias(policy: str, agents: str, target_ratio: float, warm_start: str) -> float:
    """Logit bias so that, at the start, the AND of both agents keeps the target fraction on average.

    With a warm start the attention agent keeps ``KEEP_PROBABILITY`` and the imitated similarity agent does
    the rest (``policies.warm_start``).
    """
    keep = 1.0 - target_ratio
    p = math.sqrt(keep) if agents == "both" else keep
    if warm_start != "none" and policy == "attention":
        p = KEEP_PROBABILITY
    keep_logit = math.log(p / (1 - p))
    return keep_logit if policy == "attention" else -keep_logit  # similarity votes "redundant"
