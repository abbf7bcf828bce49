"""TokenPolicyModule: the per-token scoring policy both agents use (each with its own weights).

The network is shared across tokens and sees the others only through a masked-mean context, so it works for
any number of live tokens and permuting the live rows permutes its outputs. Its action is a set of exactly
``count`` live tokens (the observation says how many), drawn by :class:`~policies.distribution.ExactCount`
from the token scores; dead rows get :data:`~policies.distribution.DEAD_SCORE`, so no set holds them. Its
observations come from ``envs.vit.features.observe``, which has already replaced non-finite values.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from envs.vit.features import AGENT_FEATURES
from policies.distribution import DEAD_SCORE, ExactCount, ExactCountEntropyStatistic

DEFAULT_HIDDEN = 64
_NETWORKS = ("token_net", "logit_net", "value_head")


class LiveEmbeddings(NamedTuple):
    """The token network's output on the live tokens only: on the CPU it is most of the module's cost, and
    after the first pruning point most tokens are dead."""

    emb: torch.Tensor
    """``[L, h]``: the embeddings of the ``L`` live tokens, row by row."""
    index: tuple[torch.Tensor, torch.Tensor]
    """``([L], [L])``: the flat row (leading dimensions flattened) and the column of each."""
    context: torch.Tensor
    """``[..., h]``: the mean live embedding of each row (a zero vector if none is live)."""


@contextlib.contextmanager
def _quiet_ray_deprecations() -> Iterator[None]:
    """Silence RLlib's deprecation log for the duration: ``RLModule.__init__`` warns about RLlib's own legacy
    ``RLModuleConfig`` on every module it builds or restores, which says nothing to our users."""
    logger = logging.getLogger("ray._common.deprecation")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class TokenPolicyModule(TorchRLModule, ValueFunctionAPI):
    """Exact-count set policy over a Dict(tokens [N, F], live [N], count [1]) observation, plus a value head.

    ``model_config``: ``hidden`` (width, default 64); ``entropy_gradient`` (default True): False when training
    has no entropy bonus, so that PPO does not differentiate the entropy (:class:`ExactCountEntropyStatistic`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _quiet_ray_deprecations():
            super().__init__(*args, **kwargs)

    @override(TorchRLModule)
    def setup(self) -> None:
        cfg = self.model_config or {}
        hidden = int(cfg.get("hidden", DEFAULT_HIDDEN))
        self._train_distribution = ExactCount if cfg.get("entropy_gradient", True) else ExactCountEntropyStatistic
        num_features = self.observation_space["tokens"].shape[-1]
        self._token_net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self._logit_net = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self._value_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # small last layer: every set starts about equally likely
            self._logit_net[-1].weight.mul_(0.01)
        self._register_load_state_dict_pre_hook(_accept_unprefixed_names)

    def macs_per_token(self) -> int:
        """Multiply-accumulates of one inference forward per live token: the token MLP and the logit MLP (the
        masked mean and activations are negligible; the value head never runs at inference)."""
        return sum(layer.in_features * layer.out_features
                   for net in (self._token_net, self._logit_net) for layer in net if isinstance(layer, nn.Linear))

    @override(RLModule)
    def get_inference_action_dist_cls(self) -> type[ExactCount]:
        return ExactCount

    @override(RLModule)
    def get_exploration_action_dist_cls(self) -> type[ExactCount]:
        return ExactCount

    @override(RLModule)
    def get_train_action_dist_cls(self) -> type[ExactCount]:
        return self._train_distribution

    def _embed(self, obs: dict[str, torch.Tensor]) -> LiveEmbeddings:
        """The live tokens' embeddings and each row's live-token context."""
        live = obs["live"] > 0.5
        flat_live = live.reshape(-1, live.shape[-1])
        rows, columns = flat_live.nonzero(as_tuple=True)
        emb = self._token_net(obs["tokens"].reshape(*flat_live.shape, -1)[rows, columns])
        total = emb.new_zeros(flat_live.shape[0], emb.shape[-1]).index_add(0, rows, emb)
        context = total / flat_live.sum(-1, keepdim=True).clamp(min=1)
        return LiveEmbeddings(emb, (rows, columns), context.reshape(*live.shape[:-1], -1))

    def _scores(self, obs: dict[str, torch.Tensor], embedded: LiveEmbeddings) -> torch.Tensor:
        """``[..., N]``: the logit net's score of each live token beside its row's context; dead tokens get
        :data:`DEAD_SCORE`."""
        rows, columns = embedded.index
        context = embedded.context.reshape(-1, embedded.context.shape[-1])
        live_scores = self._logit_net(torch.cat([embedded.emb, context[rows]], dim=-1)).squeeze(-1)
        live = obs["live"]
        scores = live_scores.new_full((context.shape[0], live.shape[-1]), DEAD_SCORE)
        return scores.index_put((rows, columns), live_scores).reshape(live.shape)

    def token_scores(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """The scores ``[..., N]`` of tokens with features ``tokens [..., N, F]`` and live mask ``live [..., N]``
        (the deterministic policy keeps the ``count`` highest)."""
        obs = {"tokens": tokens, "live": live}
        return self._scores(obs, self._embed(obs))

    def _action_dist_inputs(self, obs: dict[str, torch.Tensor], embedded: LiveEmbeddings) -> torch.Tensor:
        return torch.cat([self._scores(obs, embedded), obs["count"]], dim=-1)

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(obs, self._embed(obs))}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
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


def _accept_unprefixed_names(state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load states that name the networks without the leading underscore: checkpoints written before the
    networks were made private."""
    for key in list(state_dict):
        name = key[len(prefix):]
        if key.startswith(prefix) and name.split(".")[0] in _NETWORKS:
            state_dict[f"{prefix}_{name}"] = state_dict.pop(key)


def agent_spaces(num_patches: int, num_features: int) -> tuple[gym.spaces.Dict, gym.spaces.MultiBinary]:
    """An agent's observation (per-token features, the live mask and how many tokens to choose) and action
    (one bit per token: the chosen set) spaces."""
    observation = gym.spaces.Dict({
        "tokens": gym.spaces.Box(-np.inf, np.inf, (num_patches, num_features), np.float32),
        "live": gym.spaces.Box(0.0, 1.0, (num_patches,), np.float32),
        "count": gym.spaces.Box(0.0, float(num_patches), (1,), np.float32)})
    return observation, gym.spaces.MultiBinary(num_patches)


def policy_module_spec(policy: str, num_patches: int, model_config: dict[str, Any],
                       num_features: int | None = None) -> RLModuleSpec:
    """The spec of ``policy``'s module for a backbone with ``num_patches`` patch tokens (the env's spaces).

    ``num_features``: the module's feature count when it is rebuilt as saved (``policies.export``), so that a
    module of another feature set still loads and ``check_policies`` names the mismatch; default: the
    current features' count.
    """
    features = len(AGENT_FEATURES[policy]) if num_features is None else num_features
    observation, action = agent_spaces(num_patches, features)
    return RLModuleSpec(module_class=TokenPolicyModule, observation_space=observation, action_space=action,
                        model_config=model_config)
