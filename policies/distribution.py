"""ExactCount: a set of exactly ``c`` tokens, drawn with probability proportional to ``exp(sum of its scores)``.

This is the conditional Poisson distribution over the size-``c`` subsets of the live tokens:
``P(S) = exp(sum_{i in S} s_i) / Z``, where ``Z = e_c(exp(s))`` is the ``c``-th elementary symmetric polynomial
of the tokens' weights, computed in log space by an ``O(N * c)`` dynamic program. Its most likely set is the
``c`` highest scores, which is exactly what evaluation keeps: the agents are trained on the distribution
whose mode ships (docs/DESIGN.md, "The two agents and how their decisions combine"). PPO sees one action
per sample: the 0/1 mask ``[N]``.

The module passes the count with the scores: the distribution's inputs are ``[..., N + 1]``, the ``N`` token
scores (dead tokens very negative) followed by ``c``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchDistribution

from envs.vit.token_ops import highest

DEAD_SCORE = -1e4
"""The score of a dead token: ``exp`` of it is 0 in the dynamic program, so no set ever holds one."""
IMPOSSIBLE = -1e30
"""``log e_j`` where no subset of that size exists: a finite stand-in for ``-inf``."""


def log_symmetric_table(scores: torch.Tensor, max_count: int) -> torch.Tensor:
    """``T [B, N + 1, max_count + 1]`` with ``T[b, i, j] = log e_j(exp(scores[b, :i]))``: the log of the sum of
    ``exp(sum of scores)`` over the size-``j`` subsets of the first ``i`` tokens (:data:`IMPOSSIBLE` where there
    are none: a finite stand-in for ``-inf``, whose ``logaddexp`` has no gradient). ``scores``: ``[B, N]``, float64."""
    batch, num_tokens = scores.shape
    row = torch.full((batch, max_count + 1), IMPOSSIBLE, dtype=scores.dtype, device=scores.device)
    row = torch.cat([torch.zeros_like(row[:, :1]), row[:, 1:]], dim=1)  # e_0 = 1
    rows = [row]
    for i in range(num_tokens):
        with_token = torch.cat([torch.full_like(row[:, :1], IMPOSSIBLE), row[:, :-1] + scores[:, i:i + 1]], dim=1)
        top = torch.maximum(row, with_token)  # logaddexp by hand: torch's has NaN second derivatives here
        row = top + torch.log(torch.exp(row - top) + torch.exp(with_token - top))
        rows.append(row)
    return torch.stack(rows, dim=1)


class ExactCount(TorchDistribution):
    """Conditional Poisson sets of exactly ``count`` entries of the last axis of ``scores``.

    Args:
        logits: ``[..., N + 1]``: the scores of the ``N`` tokens (:data:`DEAD_SCORE` on dead ones), then the
            count, a whole number no larger than the live tokens.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.scores = logits[..., :-1]
        self.count = logits[..., -1].detach().round().long()
        super().__init__()

    def _get_torch_distribution(self) -> None:
        return None  # every method is implemented here

    def _log_normaliser(self, scores: torch.Tensor) -> torch.Tensor:
        """``log Z = log e_count(exp(scores))``, ``[...]``, for ``scores [..., N]``."""
        flat, count = scores.reshape(-1, scores.shape[-1]).double(), self.count.reshape(-1)
        table = log_symmetric_table(flat, int(count.max()))
        return table[:, -1].gather(1, count[:, None]).squeeze(1).reshape(self.count.shape).to(scores.dtype)

    def logp(self, value: torch.Tensor) -> torch.Tensor:
        """Log-probability of the sets ``value [..., N]`` (0/1 as float, int or bool)."""
        return (self.scores * value.to(self.scores.dtype)).sum(-1) - self._log_normaliser(self.scores)

    def _log_normaliser_and_inclusion(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``log Z`` and each token's probability of being in the set, ``d log Z / d s_i`` (they sum to the
        count), both differentiable in the scores when the scores are."""
        differentiable = self.scores.requires_grad
        with torch.enable_grad():
            scores = self.scores if differentiable else self.scores.detach().requires_grad_(True)
            log_z = self._log_normaliser(scores)
            (inclusion,) = torch.autograd.grad(log_z.sum(), scores, create_graph=differentiable)
        return (log_z, inclusion) if differentiable else (log_z.detach(), inclusion)

    def entropy(self) -> torch.Tensor:
        """``log Z - sum_i pi_i s_i`` with the inclusion probabilities ``pi`` (0 on dead tokens)."""
        log_z, inclusion = self._log_normaliser_and_inclusion()
        return log_z - (inclusion * self.scores).sum(-1)

    def kl(self, other: ExactCount) -> torch.Tensor:
        """``KL(self || other) = sum_i pi_i (s_i - s'_i) - log Z + log Z'``, for the same count on both sides."""
        log_z, inclusion = self._log_normaliser_and_inclusion()
        return (inclusion * (self.scores - other.scores)).sum(-1) - log_z + other._log_normaliser(other.scores)

    @torch.no_grad()
    def sample(self, *, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One set per row, ``[..., N]`` float 0/1, drawn token by token from the last: token ``i`` joins with
        probability ``exp(s_i) e_{r-1}(first i-1) / e_r(first i)`` while ``r`` places are left."""
        if sample_shape:
            raise ValueError("ExactCount draws one set per row")
        scores, count = self.scores.reshape(-1, self.scores.shape[-1]).double(), self.count.reshape(-1)
        table = log_symmetric_table(scores, int(count.max()))
        left = count.clone()
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        for i in range(scores.shape[1], 0, -1):
            places = left.clamp(min=1)[:, None]
            log_joins = (scores[:, i - 1] + table[:, i - 1].gather(1, places - 1).squeeze(1)
                         - table[:, i].gather(1, places).squeeze(1))
            joins = (left > 0) & (torch.rand_like(log_joins) < log_joins.exp())
            chosen[:, i - 1] = joins
            left -= joins.long()
        return chosen.reshape(self.scores.shape).to(self.scores.dtype)

    def rsample(self, *, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        raise NotImplementedError("sets have no reparameterised sample")

    @staticmethod
    def required_input_dim(space: gym.Space, **kwargs) -> int:
        """One score per binary entry, and the count."""
        assert isinstance(space, gym.spaces.MultiBinary), space
        return int(np.prod(space.shape)) + 1

    def to_deterministic(self) -> TorchDeterministic:
        """The most likely set: the ``count`` highest scores."""
        return TorchDeterministic(loc=highest(self.scores, self.count.unsqueeze(-1)).to(self.scores.dtype))
