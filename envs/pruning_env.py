"""The token-pruning process as an RLlib ``MultiAgentEnv``.

One env instance carries ``images_per_env`` images at once, so each call to the ViT server moves a
batch. Each image has an agent pair: ``attention`` and ``similarity`` when there is one image, else
``attention_<i>`` and ``similarity_<i>``; the policy of an agent is the part of its ID before ``_``
(:func:`policy_for_agent`). The agents take turns at every pruning point (``policies.decisions``): a step
in which the similarity agents mark redundant tokens, then one in which the attention agents choose the
tokens they keep among the rest, each a set of exactly the size its observation's ``count`` says; the
second step applies the AND rule and runs the next stage. The episode ends after the last stage, so every
image meets the budget exactly.

What defines the problem (agents, reward weights, target ratio) comes from ``env_config["problem"]``, a
:class:`~envs.problem.PruningProblem` as JSON; ``agents="attention"`` or ``"similarity"`` runs one agent
alone, one step per pruning point.

Reward, shared by the two agents of an image at the last step (docs/DESIGN.md, "Reward"): the fidelity
``agree_weight * [pruned argmax == unpruned argmax] + prob_weight * p_pruned(unpruned argmax)``: label-free,
so no label (and no test image) is needed to train; minus the same fidelity of the ``reward_baseline``
heuristic on the same image, a per-image baseline that does not depend on the agents' actions (the
gradient stays unbiased) and leaves a return above 0 exactly where the agents beat the heuristic.
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
from envs.vit_server import DEFAULT_NAME, NAMESPACE
from policies.decisions import TURNS, survives, turn_counts
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


def fidelity(problem: PruningProblem, agree: bool, prob_unpruned_class: float) -> float:
    """The final reward for how well a pruned forward keeps the unpruned model's answer."""
    return problem.agree_weight * float(agree) + problem.prob_weight * prob_unpruned_class


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
        if self.spec_.baseline != self.problem.reward_baseline:
            raise ValueError(f"the ViT server computes the reward baseline {self.spec_.baseline!r}, the problem "
                             f"asks for {self.problem.reward_baseline!r}")
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
        self._point: list[dict[str, np.ndarray]] = []  # per image: both agents' features and the live mask
        self._turns: list[str] = []  # the policies still to choose at the current pruning point, in order
        self._left: list[np.ndarray] = []  # per image: the tokens the turns so far have left alive
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

    def _turn_observations(self, policy: str) -> dict:
        """The observations of the agents of ``policy`` for their turn at the current pruning point: their
        features, the tokens they choose from (those left by the turns before) and how many to choose
        (:func:`~policies.decisions.turn_counts`)."""
        out = {}
        for i, point in enumerate(self._point):
            counts = dict(zip(TURNS, turn_counts(int(point["live"].sum()), self.problem.target_ratio,
                                                 self.problem.agents), strict=True))
            out[self._agent(i, policy)] = {"tokens": point[policy], "live": self._left[i].astype(np.float32),
                                           "count": np.array([counts[policy]], np.float32)}
        return out

    def _start_point(self, points: list[dict[str, np.ndarray]]) -> dict:
        """Begin the turns at a pruning point with the server's observations ``points`` (one per image); returns
        the observations of whoever chooses first."""
        self._point = points
        self._left = [point["live"] > 0.5 for point in points]
        self._turns = [policy for policy in TURNS if policy in trained_policies(self.problem.agents)]
        return self._turn_observations(self._turns[0])

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
        self.agents = list(self.possible_agents)
        obs = self._start_point(self._call("reset", self._keys, indices, self._upcoming))
        return obs, {aid: {} for aid in obs}

    def step(self, action_dict: dict):
        policy = self._turns.pop(0)
        for i, left in enumerate(self._left):
            chosen = action_dict[self._agent(i, policy)]
            self._left[i] = left & (survives(chosen, None) if policy == "attention" else survives(None, chosen))
        if self._turns:
            return self._turn_observations(self._turns[0]), {}, {"__all__": False}, {"__all__": False}, {}
        try:
            results = self._call("step", self._keys, self._left)
        except ray.exceptions.RayTaskError as error:
            if not isinstance(error.as_instanceof_cause(), EpisodeLost):
                raise
            raise self._episode_lost() from None
        except EpisodeLost:
            raise self._episode_lost() from None
        if not results[0]["done"]:
            return self._start_point([result["obs"] for result in results]), {}, {"__all__": False}, \
                {"__all__": False}, {}
        problem = self.problem
        rewards, infos = {}, {}
        for i, result in enumerate(results):
            reward = fidelity(problem, result["agree"], result["prob_unpruned_class"])
            if problem.reward_baseline != "none":
                reward -= fidelity(problem, result["baseline_agree"], result["baseline_prob_unpruned_class"])
            info = {k: result[k] for k in ("kept", "agree", "correct", "prob_unpruned_class", "kept_per_stage",
                                          "gflops_backbone", "gflops_features")}
            info.update(keep_ratio=result["kept"] / self.spec_.num_patches, image=self._images[i])
            for aid in self._image_agents[i]:
                rewards[aid] = float(reward)
                infos[aid] = info
        self._keys = []
        terminateds = {aid: True for aid in self.agents} | {"__all__": True}
        truncateds = {aid: False for aid in self.agents} | {"__all__": False}
        return self._zero_observations(), rewards, terminateds, truncateds, infos

    def _agent(self, image: int, policy: str) -> str | None:
        """The agent of ``policy`` on image ``image`` (``attention_3``, or ``attention`` with one image); None
        when ``policy`` does not act."""
        return next((aid for aid in self._image_agents[image] if policy_for_agent(aid) == policy), None)

    def _episode_lost(self) -> StepFailedRecreateEnvError:
        """The server lost our episodes (a restart): RLlib discards this episode (nothing of it is trained on),
        recreates the env and resets (``restart_failed_sub_environments``)."""
        global _episodes_lost
        _episodes_lost += 1
        self._keys = []
        return StepFailedRecreateEnvError("the ViT server lost this episode (it restarted); discarding it")
