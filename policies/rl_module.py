"""TokenPolicyModule: the RLlib module of the per-token scoring policy both agents use (each with its own weights).

Its networks and scores are :class:`~policies.token_scorer.TokenScoring`'s, which inference loads without Ray
(``policies.token_scorer.TokenScorer``). Its action is a set of exactly ``count`` live tokens (the observation
says how many), drawn by :class:`~policies.distribution.ExactCount` from the token scores; dead rows get
:data:`~policies.token_scorer.DEAD_SCORE`, so no set holds them.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from cli import library_log_quieted
from envs.vit.features import AGENT_FEATURES
from policies.distribution import ExactCount, ExactCountEntropyStatistic
from policies.token_scorer import DEFAULT_HIDDEN, TokenEmbeddings, TokenScoring


class TokenPolicyModule(TokenScoring, TorchRLModule, ValueFunctionAPI):
    """Exact-count set policy over a Dict(tokens [N, F], live [N], count [1]) observation, plus a value head.

    ``model_config``: ``hidden`` (width, default 64); ``entropy_gradient`` (default True): False when training
    has no entropy bonus, so that PPO does not differentiate the entropy (:class:`ExactCountEntropyStatistic`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with library_log_quieted("ray._common.deprecation"):  # RLModule.__init__ warns of RLlib's own legacy config
            super().__init__(*args, **kwargs)

    @override(TorchRLModule)
    def setup(self) -> None:
        cfg = self.model_config or {}
        hidden = int(cfg.get("hidden", DEFAULT_HIDDEN))
        self._train_distribution = ExactCount if cfg.get("entropy_gradient", True) else ExactCountEntropyStatistic
        self._build_networks(*self.observation_space["tokens"].shape, hidden)

    @override(RLModule)
    def get_inference_action_dist_cls(self) -> type[ExactCount]:
        return ExactCount

    @override(RLModule)
    def get_exploration_action_dist_cls(self) -> type[ExactCount]:
        return ExactCount

    @override(RLModule)
    def get_train_action_dist_cls(self) -> type[ExactCount]:
        return self._train_distribution

    def _action_dist_inputs(self, obs: dict[str, torch.Tensor], embedded: TokenEmbeddings) -> torch.Tensor:
        return torch.cat([self._scores(obs, embedded), obs["count"]], dim=-1)

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(obs, self._embed(obs))}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Also returns the context as EMBEDDINGS so PPO's value loss does not re-run the token MLP."""
        obs = batch[Columns.OBS]
        embedded = self._embed(obs)
        return {Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(obs, embedded),
                Columns.EMBEDDINGS: embedded.context}

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The value of the live-token context. The value head reads the token embeddings but does not train
        them (docs/DESIGN.md, "Warm start")."""
        if embeddings is None:
            embeddings = self._embed(batch[Columns.OBS]).context
        return self._value_head(embeddings.detach()).squeeze(-1)


def agent_spaces(num_patches: int, num_features: int) -> tuple[gym.spaces.Dict, gym.spaces.MultiBinary]:
    """An agent's observation (per-token features, the live mask and how many tokens to choose) and action
    (one bit per token: the chosen set) spaces."""
    observation = gym.spaces.Dict({
        "tokens": gym.spaces.Box(-np.inf, np.inf, (num_patches, num_features), np.float32),
        "live": gym.spaces.Box(0.0, 1.0, (num_patches,), np.float32),
        "count": gym.spaces.Box(0.0, float(num_patches), (1,), np.float32)})
    return observation, gym.spaces.MultiBinary(num_patches)


def policy_module_spec(policy: str, num_patches: int, model_config: dict[str, Any]) -> RLModuleSpec:
    """The spec of ``policy``'s module for a backbone with ``num_patches`` patch tokens (the env's spaces)."""
    observation, action = agent_spaces(num_patches, len(AGENT_FEATURES[policy]))
    return RLModuleSpec(module_class=TokenPolicyModule, observation_space=observation, action_space=action,
                        model_config=model_config)
