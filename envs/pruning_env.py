"""The token-pruning process as an RLlib ``MultiAgentEnv``.

One env instance carries ``images_per_env`` images at once, so each call to the ViT server moves a
batch. Each image has an agent pair: ``attention`` and ``similarity`` when there is one image, else
``attention_<i>`` and ``similarity_<i>``; the policy of an agent is the part of its ID before ``_``
(:func:`policy_for_agent`). Every pruning point is one step in which both agents of every image act
on the tokens still alive; the episode ends after the last stage.

What defines the problem (agents, reward weights, target ratio) comes from ``env_config["problem"]``, a
:class:`~envs.problem.PruningProblem` as JSON. The two agents' decisions combine by the AND rule of
``policies.decisions`` (docs/DESIGN.md); ``agents="attention"`` or ``"similarity"`` runs one agent alone.

Reward, shared by the two agents of an image (docs/DESIGN.md, "Reward"):
- at every step, ``-budget_weight * |kept / target - 1|`` where ``target = tokens_to_keep(live, ratio)``:
  the budget is measured in kept patch tokens per pruning point;
- at the last step, ``agree_weight * [pruned argmax == unpruned argmax]
  + prob_weight * p_pruned(unpruned argmax)``: label-free fidelity, so no label (and no test image) is
  needed to train.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from envs.problem import POLICIES, PruningProblem
from envs.pruning_engine import EngineSpec, EpisodeLost
from envs.vit.token_ops import tokens_to_keep
from envs.vit_server import DEFAULT_NAME, NAMESPACE
from policies.decisions import survives
from policies.rl_module import agent_spaces

DEFAULT_ENV_CONFIG: dict[str, Any] = {
    "server_name": DEFAULT_NAME,  # the ViT server to find by name (or "server": an in-process engine)
    "seed": 0,
    "server_timeout_s": 120.0,
}


def trained_policies(agents: str) -> tuple[str, ...]:
    """The policies an ``agents`` mode trains: both, or the one it names."""
    return POLICIES if agents == "both" else (agents,)


def policy_for_agent(agent_id: str, *args, **kwargs) -> str:
    """``attention_3`` -> ``attention``; the policy mapping function of training."""
    return agent_id.split("_")[0]


class TokenPruningEnv(MultiAgentEnv):
    """Both agents prune the tokens of ``images_per_env`` images, one pruning point per step."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        unknown = sorted(set(config or {}) - {*DEFAULT_ENV_CONFIG, "problem", "server"})
        if unknown:
            raise ValueError(f"unknown env_config keys: {', '.join(unknown)}")
        self.config = {**DEFAULT_ENV_CONFIG, **(config or {})}
        self.problem = PruningProblem.from_json(self.config.get("problem", {}))
        self._server = self.config.get("server") or self._lookup_server()
        self.spec_: EngineSpec = self._call("spec")
        self.num_images = self.problem.images_per_env
        policies = trained_policies(self.problem.agents)
        suffixes = [""] if self.num_images == 1 else [f"_{i}" for i in range(self.num_images)]
        self._image_agents = [[f"{p}{s}" for p in policies] for s in suffixes]
        self.possible_agents = [aid for pair in self._image_agents for aid in pair]
        self.agents = list(self.possible_agents)
        spaces = {aid: agent_spaces(self.spec_.num_patches, self.spec_.num_features[policy_for_agent(aid)])
                  for aid in self.possible_agents}
        self.observation_spaces = {aid: observation for aid, (observation, _) in spaces.items()}
        self.action_spaces = {aid: action for aid, (_, action) in spaces.items()}
        self._rng = np.random.default_rng(self.config["seed"])
        self._episode = 0
        self._keys: list[str] = []
        self._live: list[int] = []
        self._instance = f"{id(self):x}-{time.monotonic_ns():x}"

    # -- server access -------------------------------------------------------------------------------

    def _lookup_server(self):
        name = self.config["server_name"]
        deadline = time.monotonic() + float(self.config["server_timeout_s"])
        while True:
            try:
                return ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ViT server named {name!r} in namespace {NAMESPACE!r}") from None
                time.sleep(0.5)

    def _call(self, method: str, *args):
        """Call the server; if its actor died, wait (up to ``server_timeout_s``) for Ray's restart and retry."""
        if not isinstance(self._server, ray.actor.ActorHandle):
            return getattr(self._server, method)(*args)  # an in-process engine (tests, debugging)
        deadline = time.monotonic() + float(self.config["server_timeout_s"])
        while True:
            try:
                return ray.get(getattr(self._server, method).remote(*args))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ViT server unreachable for {self.config['server_timeout_s']} s") from error
                time.sleep(0.5)
                self._server = self._lookup_server()

    # -- episode -------------------------------------------------------------------------------------

    def _zero_observations(self) -> dict:
        """Final observations (RLlib wants one per agent when the episode ends; nothing reads them)."""
        return {aid: {k: np.zeros(space.shape, np.float32) for k, space in self.observation_spaces[aid].items()}
                for aid in self.agents}

    def _observations(self, results: list[dict]) -> dict:
        out = {}
        for i, result in enumerate(results):
            obs = result["obs"] if "obs" in result else result
            for aid in self._image_agents[i]:
                out[aid] = {"tokens": obs[policy_for_agent(aid)], "live": obs["live"]}
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        if self._keys:
            self._call("release", self._keys)
        self._episode += 1
        self._keys = [f"{self._instance}-{self._episode}-{i}" for i in range(self.num_images)]
        indices = self._rng.integers(0, self.spec_.num_images, self.num_images).tolist()
        self._images = indices
        results = self._call("reset", self._keys, indices)
        self._live = [int(r["live"].sum()) for r in results]
        self.agents = list(self.possible_agents)
        return self._observations(results), {aid: {} for aid in self.agents}

    def step(self, action_dict: dict):
        keep = []
        for i in range(self.num_images):
            decisions = {policy_for_agent(aid): action_dict.get(aid) for aid in self._image_agents[i]}
            keep.append(survives(decisions.get("attention"), decisions.get("similarity")))
        try:
            results = self._call("step", self._keys, keep)
        except ray.exceptions.RayTaskError as error:
            if not isinstance(error.as_instanceof_cause(), EpisodeLost):
                raise
            return self._truncate()
        except EpisodeLost:
            return self._truncate()
        problem = self.problem
        obs, rewards, infos = {}, {}, {}
        done = results[0]["done"]
        for i, result in enumerate(results):
            target = tokens_to_keep(self._live[i], problem.target_ratio)
            reward = -problem.budget_weight * abs(result["kept"] / target - 1.0)
            info: dict[str, Any] = {"kept": result["kept"], "target": target}
            if done:
                reward += problem.agree_weight * float(result["agree"])
                reward += problem.prob_weight * result["prob_unpruned_class"]
                info.update({k: result[k] for k in ("agree", "correct", "prob_unpruned_class",
                                                    "kept_per_stage", "gflops_backbone", "gflops_features")})
                info["keep_ratio"] = result["kept"] / self.spec_.num_patches
                info["image"] = self._images[i]
            else:
                self._live[i] = result["kept"]
            for aid in self._image_agents[i]:
                rewards[aid] = float(reward)
                infos[aid] = info
        if not done:
            obs = self._observations(results)
        else:
            self._keys = []
            obs = self._zero_observations()
        terminateds = {aid: done for aid in self.agents} | {"__all__": done}
        truncateds = {aid: False for aid in self.agents} | {"__all__": False}
        return obs, rewards, terminateds, truncateds, infos

    def _truncate(self):
        """The server lost our episodes (restart): end this episode without reward; reset starts anew."""
        self._keys = []
        obs = self._zero_observations()
        zeros = {aid: 0.0 for aid in self.agents}
        flags = {aid: False for aid in self.agents} | {"__all__": False}
        truncs = {aid: True for aid in self.agents} | {"__all__": True}
        return obs, zeros, flags, truncs, {aid: {"server_restart": True} for aid in self.agents}
