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

import os
import time
from typing import Any

import numpy as np
import ray
from ray.rllib.env.env_errors import StepFailedRecreateEnvError
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from envs.problem import POLICIES, PruningProblem
from envs.pruning_engine import EngineSpec, EpisodeLost
from envs.vit.token_ops import tokens_to_keep
from envs.vit_server import DEFAULT_NAME, NAMESPACE
from policies.decisions import survives
from policies.rl_module import agent_spaces

DEFAULT_ENV_CONFIG: dict[str, Any] = {
    "server_name": DEFAULT_NAME,  # the ViT server to find by name, or a list of names: runner i uses name i % n
                                  # ("server" instead: an in-process engine)
    "seed": 0,
    "server_timeout_s": 120.0,
}


def trained_policies(agents: str) -> tuple[str, ...]:
    """The policies an ``agents`` mode trains: both, or the one it names."""
    return POLICIES if agents == "both" else (agents,)


def policy_for_agent(agent_id: str, *args, **kwargs) -> str:
    """``attention_3`` -> ``attention``; the policy mapping function of training."""
    return agent_id.split("_")[0]


_episodes_lost = 0  # in this process; RLlib recreates the env after each, and the new one must not replay


def image_stream_key(config: dict | None) -> tuple[int, ...]:
    """What makes each env's image stream its own, mixed with the seed into a ``SeedSequence``: the env
    runner's index, the sub-env's index, the episodes this process lost before (RLlib recreates the env
    and re-seeds it with the same seed) and, in a runner Ray restarted, its process id (so that it does not
    replay its predecessor's images). Plain sums such as ``seed + runner + sub-env`` collide."""
    worker, vector = getattr(config, "worker_index", 0), getattr(config, "vector_index", 0)
    restarted = (os.getpid(),) if getattr(config, "recreated_worker", False) else ()
    return (worker, vector, _episodes_lost, *restarted)


class TokenPruningEnv(MultiAgentEnv):
    """Both agents prune the tokens of ``images_per_env`` images, one pruning point per step."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        unknown = sorted(set(config or {}) - {*DEFAULT_ENV_CONFIG, "problem", "server"})
        if unknown:
            raise ValueError(f"unknown env_config keys: {', '.join(unknown)}")
        self.config = {**DEFAULT_ENV_CONFIG, **(config or {})}
        self.problem = PruningProblem.from_json(self.config.get("problem", {}))
        names = self.config["server_name"]
        self._server_name = (names[getattr(config, "worker_index", 0) % len(names)] if isinstance(names, list)
                             else names)
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
        self._stream = image_stream_key(config)
        self._rng = np.random.default_rng([self.config["seed"], *self._stream])
        self._upcoming: list[int] | None = None
        self._episode = 0
        self._keys: list[str] = []
        self._live: list[int] = []
        self._instance = f"{id(self):x}-{time.monotonic_ns():x}"

    # -- server access -------------------------------------------------------------------------------

    def _lookup_server(self):
        name = self._server_name
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

    def _draw_images(self) -> list[int]:
        return self._rng.integers(0, self.spec_.num_images, self.num_images).tolist()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng([seed, *self._stream])
            self._upcoming = None
        if self._keys:
            self._call("release", self._keys)
        self._episode += 1
        self._keys = [f"{self._instance}-{self._episode}-{i}" for i in range(self.num_images)]
        indices = self._upcoming or self._draw_images()  # the k-th episode uses the k-th draw
        self._upcoming = self._draw_images()  # the server reads them ahead when it streams
        self._images = indices
        results = self._call("reset", self._keys, indices, self._upcoming)
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
            raise self._episode_lost() from None
        except EpisodeLost:
            raise self._episode_lost() from None
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

    def _episode_lost(self) -> StepFailedRecreateEnvError:
        """The server lost our episodes (a restart): RLlib discards this episode (nothing of it is trained on),
        recreates the env and resets (``restart_failed_sub_environments``)."""
        global _episodes_lost
        _episodes_lost += 1
        self._keys = []
        return StepFailedRecreateEnvError("the ViT server lost this episode (it restarted); discarding it")
