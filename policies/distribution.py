"""ExactCount: a set of exactly ``c`` tokens, drawn with probability proportional to ``exp(sum of its scores)``.

This is the conditional Poisson distribution over the size-``c`` subsets of the live tokens:
``P(S) = exp(sum_{i in S} s_i) / Z``, where ``Z = e_c(exp(s))`` is the ``c``-th elementary symmetric polynomial
of the tokens' weights: the coefficient of ``t^c`` in ``prod_i (1 + exp(s_i) t)``. :func:`polynomial_tree`
multiplies those factors pairwise in log space, ``log2 N`` batched levels instead of ``N`` sequential steps
(PPO differentiates ``log Z`` twice per minibatch, for the log-probability and the entropy); the same tree
draws a set top-down (:meth:`ExactCount.sample`). Its most likely set is the ``c`` highest scores, which is
exactly what evaluation keeps: the agents are trained on the distribution whose mode ships (docs/DESIGN.md,
"The two agents and how their decisions combine"). PPO sees one action per sample: the 0/1 mask ``[N]``.

The module passes the count with the scores: the distribution's inputs are ``[..., N + 1]``, the ``N`` token
scores (dead tokens very negative) followed by ``c``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchDistribution
from ray.rllib.utils.annotations import override

from envs.vit.token_ops import highest
from policies.token_scorer import DEAD_SCORE

IMPOSSIBLE = -1e30
"""The log-coefficient of a subset size that does not exist: a finite stand-in for ``-inf``, whose gradients
would be NaN."""
UNDERFLOW = -80.0
"""The shifted log-terms of :func:`_log_sum_exp` are raised to this before ``exp``: a term this far below the
largest (whose ``exp`` is 1) is beyond float32's precision of the sum anyway, and torch's CPU ``exp`` is several
times slower on arguments whose result underflows (``-88`` and below), which most padded terms are."""


def _log_sum_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` along ``dim`` with a detached shift, written out: its first and second derivatives stay
    finite where every entry is :data:`IMPOSSIBLE` (torch's ``logaddexp`` has NaN second derivatives there)."""
    top = x.detach().amax(dim, keepdim=True)
    return (top + torch.log(torch.exp((x - top).clamp(min=UNDERFLOW)).sum(dim, keepdim=True))).squeeze(dim)


def _log_product(left: torch.Tensor, right: torch.Tensor, max_count: int) -> torch.Tensor:
    """The log-coefficients of the products of polynomials given by log-coefficients ``left``, ``right``
    ``[B, P, d]`` (degrees ``0 .. d - 1``), up to degree ``max_count``: ``[B, P, min(2d - 1, max_count + 1)]``.
    Coefficient ``j`` sums ``left[a] + right[b]`` over ``a + b = j``: each row ``a`` of the ``[d, d]`` table
    of sums is shifted right by ``a`` (padding to width ``2d`` and re-reading the rows at width ``2d - 1``),
    which lines up the ``a + b = j`` entries in column ``j``."""
    d = left.shape[-1]
    sums = F.pad(left[..., :, None] + right[..., None, :], (0, d), value=IMPOSSIBLE)  # [B, P, d, 2d]
    shifted = sums.flatten(-2)[..., :d * (2 * d - 1)].unflatten(-1, (d, 2 * d - 1))
    return _log_sum_exp(shifted, -2)[..., :max_count + 1]


def polynomial_tree(scores: torch.Tensor, max_count: int) -> list[torch.Tensor]:
    """The pairwise products of ``prod_i (1 + exp(scores_i) t)`` as log-coefficients up to degree ``max_count``,
    one tensor per level: level 0 holds the factors ``[B, W, 2]`` (``W``: ``N`` rounded up to a power of two, at
    least 2, padded with dead tokens), level ``l`` the products of ``2^l`` consecutive factors, the last the
    two halves ``[B, 2, C]``. The root's coefficients are not formed: a row needs one of them only, its count's
    (:func:`split_log_weights`), and forming them all would be the tree's largest step. ``scores``: ``[B, N]``."""
    batch, num_tokens = scores.shape
    width = max(2, 1 << max(num_tokens - 1, 0).bit_length())
    padded = torch.cat([scores, scores.new_full((batch, width - num_tokens), DEAD_SCORE)], dim=1)
    levels = [torch.stack([torch.zeros_like(padded), padded], dim=-1)[..., :max_count + 1]]
    while levels[-1].shape[1] > 2:
        levels.append(_log_product(levels[-1][:, 0::2], levels[-1][:, 1::2], max_count))
    return levels


def split_log_weights(children: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """The log-weights ``[B, P, d]`` of the ways ``P`` nodes can share their ``members [B, P]`` between their
    halves, whose log-coefficients ``children [B, 2P, d]`` alternate left, right: entry ``j`` is ``log
    e_j(left) + log e_{r-j}(right)``, the left half holding ``j`` of the ``r`` members, and :data:`IMPOSSIBLE`
    where a half has no coefficient of that degree. Their log-sum-exp over ``j`` is the node's ``log e_r``."""
    left, right = children[:, 0::2], children[:, 1::2]
    given = torch.arange(left.shape[-1], device=left.device)  # members the left half may take
    rest = members[..., None] - given  # those its right half then holds
    fits = (rest >= 0) & (rest < right.shape[-1])
    log_weights = left + right.gather(-1, rest.clamp(0, right.shape[-1] - 1))
    return log_weights.masked_fill(~fits, IMPOSSIBLE)


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
        self._log_z: torch.Tensor | None = None  # log Z of ``scores``, with its graph where they have one
        super().__init__()

    @override(TorchDistribution)
    def _get_torch_distribution(self) -> None:
        return None  # every method is implemented here

    def _log_normaliser(self, scores: torch.Tensor) -> torch.Tensor:
        """``log Z = log e_count(exp(scores))``, ``[...]``, for ``scores [..., N]``."""
        flat, count = scores.reshape(-1, scores.shape[-1]), self.count.reshape(-1)
        halves = polynomial_tree(flat, int(count.max()))[-1]
        return _log_sum_exp(split_log_weights(halves, count[:, None]), -1)[:, 0].reshape(self.count.shape)

    def _scores_log_normaliser(self) -> torch.Tensor:
        """``log Z`` of this distribution's ``scores``, computed once: PPO's loss asks for the log-probability and
        then the entropy of the same distribution, and both need it. Differentiable when the scores are."""
        if self._log_z is None:
            with torch.enable_grad():  # the graph exists exactly when the scores require grad
                self._log_z = self._log_normaliser(self.scores)
        return self._log_z

    @override(TorchDistribution)
    def logp(self, value: torch.Tensor) -> torch.Tensor:
        """Log-probability of the sets ``value [..., N]`` (0/1 as float, int or bool)."""
        return (self.scores * value.to(self.scores.dtype)).sum(-1) - self._scores_log_normaliser()

    def _log_normaliser_and_inclusion(self, differentiable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``log Z`` and each token's probability of being in the set, ``d log Z / d s_i`` (they sum to the
        count); both differentiable in the scores when ``differentiable`` and the scores are."""
        if self.scores.requires_grad:  # the normaliser's graph is kept for the loss that also uses it
            log_z = self._scores_log_normaliser()
            (inclusion,) = torch.autograd.grad(log_z.sum(), self.scores, create_graph=differentiable,
                                               retain_graph=True)
            return (log_z, inclusion) if differentiable else (log_z.detach(), inclusion)
        with torch.enable_grad():
            scores = self.scores.detach().requires_grad_(True)
            log_z = self._log_normaliser(scores)
            (inclusion,) = torch.autograd.grad(log_z.sum(), scores)
        return log_z.detach(), inclusion

    def _entropy(self, differentiable: bool) -> torch.Tensor:
        """``log Z - sum_i pi_i s_i`` with the inclusion probabilities ``pi`` (0 on dead tokens), differentiable
        in the scores when ``differentiable`` and the scores are."""
        log_z, inclusion = self._log_normaliser_and_inclusion(differentiable)
        return log_z - (inclusion * (self.scores if differentiable else self.scores.detach())).sum(-1)

    @override(TorchDistribution)
    def entropy(self) -> torch.Tensor:
        return self._entropy(differentiable=True)

    @override(TorchDistribution)
    def kl(self, other: ExactCount) -> torch.Tensor:
        """``KL(self || other) = sum_i pi_i (s_i - s'_i) - log Z + log Z'``, for the same count on both sides."""
        log_z, inclusion = self._log_normaliser_and_inclusion()
        return (inclusion * (self.scores - other.scores)).sum(-1) - log_z + other._scores_log_normaliser()

    @override(TorchDistribution)
    @torch.no_grad()
    def sample(self, *, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One set per row, ``[..., N]`` float 0/1, drawn down :func:`polynomial_tree`: a node that must hold
        ``r`` members gives ``j`` of them to its left half with probability ``e_j(left) e_{r-j}(right) / e_r``,
        down to the single tokens, which are in the set when they are given one."""
        if sample_shape:
            raise ValueError("ExactCount draws one set per row")
        scores, count = self.scores.reshape(-1, self.scores.shape[-1]), self.count.reshape(-1)
        members = count[:, None]  # [B, nodes]: how many members each node of the current level holds
        for children in reversed(polynomial_tree(scores, int(count.max()))):
            log_weights = split_log_weights(children, members)
            uniform = torch.rand_like(log_weights).clamp(min=torch.finfo(log_weights.dtype).tiny)  # 0: -inf noise
            gumbel = -torch.log(-torch.log(uniform))  # argmax of log-weights + Gumbel noise: a draw by weight, in
            to_left = (log_weights + gumbel).argmax(-1)  # which an impossible share never wins
            members = torch.stack([to_left, members - to_left], dim=-1).flatten(1)
        chosen = members[:, :scores.shape[1]] > 0
        return chosen.reshape(self.scores.shape).to(self.scores.dtype)

    @override(TorchDistribution)
    def rsample(self, *, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        raise NotImplementedError("sets have no reparameterised sample")

    @override(TorchDistribution)
    @staticmethod
    def required_input_dim(space: gym.Space, **kwargs: object) -> int:
        """One score per binary entry, and the count."""
        assert isinstance(space, gym.spaces.MultiBinary), space
        return int(np.prod(space.shape)) + 1

    @override(TorchDistribution)
    def to_deterministic(self) -> TorchDeterministic:
        """The most likely set: the ``count`` highest scores."""
        return TorchDeterministic(loc=highest(self.scores, self.count.unsqueeze(-1)).to(self.scores.dtype))


class ExactCountEntropyStatistic(ExactCount):
    """:class:`ExactCount` whose entropy is reported but not differentiated.

    RLlib's PPO loss always subtracts ``entropy_coeff * entropy`` and so differentiates the entropy, which is a
    derivative of the normaliser and makes its backward pass a second derivative, even at ``entropy_coeff`` 0.
    Without an entropy bonus, training uses this class (``TokenPolicyModule``'s ``entropy_gradient``): the same
    values, a first-order backward pass only, and the normaliser that the loss's log-probability computed.
    """

    @override(ExactCount)
    def entropy(self) -> torch.Tensor:
        return self._entropy(differentiable=False)
