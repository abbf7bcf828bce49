"""MultiBernoulli: one independent keep/drop decision per token, as a single RLlib action distribution.

PPO treats the whole ``MultiBinary(N)`` vector as one action, so log-probability, entropy and KL are summed
over the token axis (the joint of independent Bernoullis), giving one number per sample as the loss expects.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchDistribution


class MultiBernoulli(TorchDistribution):
    """Independent Bernoulli per entry of the last axis of ``logits`` (``[..., N]``)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        super().__init__(logits=logits)

    def _get_torch_distribution(self, logits: torch.Tensor) -> torch.distributions.Bernoulli:
        return torch.distributions.Bernoulli(logits=logits, validate_args=False)

    def logp(self, value: torch.Tensor) -> torch.Tensor:
        """Joint log-probability; ``value`` may be float, int or bool 0/1 (env runners hand back any)."""
        return self._dist.log_prob(value.to(self.logits.dtype)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return self._dist.entropy().sum(-1)

    def kl(self, other: MultiBernoulli) -> torch.Tensor:
        return torch.distributions.kl.kl_divergence(self._dist, other._dist).sum(-1)

    def rsample(self, *, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Straight-through sample (RLlib's convention for discrete rsample): hard 0/1 forward, prob grads."""
        hard = self.sample(sample_shape=sample_shape)
        probs = self._dist.probs
        return hard + probs - probs.detach()

    @staticmethod
    def required_input_dim(space: gym.Space, **kwargs) -> int:
        """One logit per binary entry."""
        assert isinstance(space, gym.spaces.MultiBinary), space
        return int(np.prod(space.shape))

    def to_deterministic(self) -> TorchDeterministic:
        """Keep exactly the entries with probability above 0.5."""
        return TorchDeterministic(loc=(self.logits > 0).to(self.logits.dtype))
