"""TokenPolicyModule: the per-token keep/redundant policy both agents use (each with its own weights).

The network is shared across tokens and sees the others only through a masked-mean context, so it works for
any number of live tokens and permuting the live rows permutes its outputs. Dead rows get a fixed very
negative logit: they are deterministically 0 and contribute ~nothing to log-probability or entropy.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from policies.distribution import MultiBernoulli

DEAD_LOGIT = -20.0
DEFAULT_HIDDEN = 64


def masked_mean(emb: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Mean of ``emb [..., N, h]`` over rows with ``live [..., N]`` = 1 (a zero vector if none are live)."""
    total = (emb * live.unsqueeze(-1)).sum(-2)
    return total / live.sum(-1, keepdim=True).clamp(min=1.0)


def policy_gflops(num_tokens: int, num_features: int, hidden: int) -> float:
    """Multiply-accumulates (GFLOPs, DeiT convention) of one policy forward on one image's live tokens.

    Counts the linear layers of the inference path (token MLP and logit MLP, run per token); the pooling and
    activations are negligible and the value head is never run at inference.
    """
    per_token = num_features * hidden + hidden * hidden + 2 * hidden * hidden + hidden
    return num_tokens * per_token / 1e9


class TokenPolicyModule(TorchRLModule, ValueFunctionAPI):
    """Per-token Bernoulli policy over a Dict(tokens [N, F], live [N]) observation, plus a value head.

    ``model_config``: ``hidden`` (width, default 64) and ``init_logit_bias`` (initial logit of every live
    token, default 0.0, i.e. start from keep probability sigmoid(bias)).
    """

    def setup(self) -> None:
        cfg = self.model_config or {}
        hidden = int(cfg.get("hidden", DEFAULT_HIDDEN))
        num_features = self.observation_space["tokens"].shape[-1]
        self.token_net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.logit_net = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.value_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        last = self.logit_net[-1]
        with torch.no_grad():  # small last layer: every token starts near the configured keep probability
            last.weight.mul_(0.01)
            last.bias.fill_(float(cfg.get("init_logit_bias", 0.0)))

    def get_inference_action_dist_cls(self) -> type[MultiBernoulli]:
        return MultiBernoulli

    def get_exploration_action_dist_cls(self) -> type[MultiBernoulli]:
        return MultiBernoulli

    def get_train_action_dist_cls(self) -> type[MultiBernoulli]:
        return MultiBernoulli

    def _embed(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token embeddings ``[..., N, h]`` and the live-token context ``[..., h]``.

        Non-finite features (the engine counts them) become 0 so one bad token cannot poison a batch.
        """
        emb = self.token_net(torch.nan_to_num(obs["tokens"], nan=0.0, posinf=0.0, neginf=0.0))
        return emb, masked_mean(emb, obs["live"])

    def _logits(self, obs: dict[str, torch.Tensor], emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([emb, context.unsqueeze(-2).expand_as(emb)], dim=-1)
        logits = self.logit_net(joint).squeeze(-1)
        return torch.where(obs["live"] > 0.5, logits, torch.full_like(logits, DEAD_LOGIT))

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        emb, context = self._embed(obs)
        return {Columns.ACTION_DIST_INPUTS: self._logits(obs, emb, context)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Also returns the context as EMBEDDINGS so PPO's value loss does not re-run the token MLP."""
        obs = batch[Columns.OBS]
        emb, context = self._embed(obs)
        return {Columns.ACTION_DIST_INPUTS: self._logits(obs, emb, context), Columns.EMBEDDINGS: context}

    def compute_values(self, batch: dict[str, Any], embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The value of the live-token context. The value head reads the token embeddings but does not train
        them: a value loss flowing into the shared token network moves every token's logit at once (it
        wrecked a warm-started policy within two PPO iterations)."""
        if embeddings is None:
            embeddings = self._embed(batch[Columns.OBS])[1]
        return self.value_head(embeddings.detach()).squeeze(-1)
