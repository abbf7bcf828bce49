"""The token-pruning process as an RLlib ``MultiAgentEnv``.

One env instance carries ``images_per_env`` images at once, so each call to the ViT server moves a
batch. Each image has an agent pair: ``attention`` and ``similarity`` when there is one image, else
``attention_<i>`` and ``similarity_<i>``; the policy of an agent is the part of its ID before ``_``
(:func:`policy_for_agent`). The agents take turns at every pruning point (``policies.decisions``): a step
in which the attention agents choose tokens to keep, then one in which the similarity agents remove
redundant tokens among the others, each a set of exactly the size its observation's ``count`` says; the
second step runs the next stage on the survivors. The episode ends after the last stage, so every image
meets the budget exactly.

What defines the problem (agents, reward weights, target ratio) comes from ``env_config["problem"]``, a
:class:`~envs.problem.PruningProblem` as JSON; ``agents="attention"`` or ``"similarity"`` runs one agent
alone, one step per pruning point. Each image prunes at its own removal ratio, drawn from the problem's
``ratios_trained`` (the rollouts of one image share it); the agents see it in their features.

Reward, shared by the two agents of an image at the last step (docs/DESIGN.md, "Reward"): the fidelity
``agree_weight * [pruned argmax == unpruned argmax] + prob_weight * p + logprob_weight * log p`` with ``p`` the
pruned model's probability of the unpruned argmax: label-free, so no label (and no test image) is needed to
train; minus a per-image baseline that does not depend on the agents' actions (the gradient stays unbiased):
the same fidelity of the ``reward_baseline`` heuristic on the same image, which leaves a return above 0
exactly where the agents beat the heuristic, or with ``"rollouts"`` the mean fidelity of the image's other
``rollouts_per_image - 1`` rollouts in the same env (leave-one-out, as in RLOO), which leaves a return above 0
exactly where a rollout beats the agents' own average on that image.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import ray
from ray.rllib.env.env_errors import StepFailedRecreateEnvError
from ray.rllib.env.multi_agent_env import MultiAgentEnv
from ray.rllib.utils.annotations import override

from envs.errors import UsageError
from envs.problem import PruningProblem
from envs.pruning_engine import EngineSpec, EpisodeLost
from envs.vit.data import DataError
from envs.vit_server import DEFAULT_NAME, NAMESPACE, RESTART_TIMEOUT_S, call_through_restarts, remote_cause
from policies.decisions import POLICIES, choosable, survives, trained_policies, turn_counts
from policies.rl_module import agent_spaces

DEFAULT_ENV_CONFIG: dict[str, Any] = {
    "server_name": DEFAULT_NAME,  # the ViT server to find by name, or a list of names: runner i uses name i % n
                                  # ("server" instead: an in-process engine)
    "seed": 0,
    "resumed_at": 0,  # the iteration a resumed run goes on from: its image streams go on with new images
    "server_timeout_s": RESTART_TIMEOUT_S,
    "data_error_wait_s": 0.0,  # how long a reset that met an unreadable image waits before it fails (train.py's
                               # envs: a minute, for its driver to stop the run as RLlib retries the reset)
}


def env_steps_per_episode(problem: PruningProblem) -> int:
    """The env steps one episode (one image per agent pair) takes: a turn per acting agent per pruning point."""
    return len(problem.prune_points) * len(trained_policies(problem.agents))


def policy_for_agent(agent_id: str, *args: object, **kwargs: object) -> str:
    """``attention_3`` -> ``attention``; the policy mapping function of training."""
    return agent_id.partition("_")[0]


def image_of_agent(agent_id: str) -> str:
    """``attention_3`` -> ``3``: which of the env's images an agent decides for (``""`` in an env of one)."""
    return agent_id.partition("_")[2]


MIN_PROB = 1e-6
"""Floor of the probability whose log the reward takes, so that a lost answer costs a finite amount."""


def fidelity(problem: PruningProblem, agree: bool, prob_unpruned_class: float) -> float:
    """The final reward for how well a pruned forward keeps the unpruned model's answer."""
    return (problem.agree_weight * float(agree) + problem.prob_weight * prob_unpruned_class
            + problem.logprob_weight * float(np.log(max(prob_unpruned_class, MIN_PROB))))


def leave_one_out_means(values: np.ndarray, group: int) -> np.ndarray:
    """For each of ``values [n]`` (consecutive groups of ``group`` rollouts of one image), the mean of the other
    values of its group."""
    grouped = values.reshape(-1, group)
    return ((grouped.sum(1, keepdims=True) - grouped) / (group - 1)).reshape(-1)


_episodes_lost = 0  # in this process; RLlib recreates the env after each, and the new one must not replay


def actor_was_restarted() -> bool:
    """Whether this process is a Ray actor that Ray restarted: an env runner replaced after a crash (RLlib's
    new API stack restarts the same actor, so its ``EnvContext.recreated_worker`` stays False)."""
    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)


def image_stream_key(config: dict | None) -> tuple[int, ...]:
    """What makes each env's image stream its own, mixed with the seed into a ``SeedSequence``: the env
    runner's index, the sub-env's index, the episodes this process lost before (RLlib recreates the env
    and re-seeds it with the same seed), in a resumed run the iteration it goes on from (``resumed_at``), and
    in a runner Ray restarted (:func:`actor_was_restarted`) its process id: neither replays the images its
    predecessor trained on. RLlib seeds sub-env ``i`` of runner ``r`` with ``seed + r + i``: the runner's index
    keeps runner 1's second sub-env and runner 2's first apart."""
    worker, vector = getattr(config, "worker_index", 0), getattr(config, "vector_index", 0)
    resumed_at = (config or {}).get("resumed_at", 0)
    resumed = (resumed_at,) if resumed_at else ()
    restarted = (os.getpid(),) if actor_was_restarted() else ()
    return (worker, vector, _episodes_lost, *resumed, *restarted)


class TokenPruningEnv(MultiAgentEnv):
    """Both agents prune the tokens of ``images_per_env`` images; at each pruning point they take turns, one
    step per turn (one step per pruning point when only one agent acts)."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        unknown = sorted(set(config or {}) - {*DEFAULT_ENV_CONFIG, "problem", "server"})
        if unknown:
            raise UsageError(f"unknown env_config keys: {', '.join(unknown)}")
        self.config = {**DEFAULT_ENV_CONFIG, **(config or {})}
        self.problem = PruningProblem.from_json(self.config.get("problem", {}))
        names = self.config["server_name"]
        self._server_name = (names[getattr(config, "worker_index", 0) % len(names)] if isinstance(names, list)
                             else names)
        self._server = self.config.get("server") or self._lookup_server()
        self.spec_: EngineSpec = self._call("spec")
        if self.spec_.baseline != self.problem.baseline_heuristic:
            raise UsageError(f"the ViT server computes the reward baseline {self.spec_.baseline!r}, the problem "
                             f"asks for {self.problem.baseline_heuristic!r}")
        self.num_images = self.problem.images_per_env
        policies = trained_policies(self.problem.agents)
        suffixes = [""] if self.num_images == 1 else [f"_{i}" for i in range(self.num_images)]
        self._image_agents = [[f"{p}{s}" for p in policies] for s in suffixes]
        self.possible_agents = [aid for pair in self._image_agents for aid in pair]
        self.agents = list(self.possible_agents)
        # One space object per policy, shared by its agents: RLlib pickles the agents' spaces into every
        # checkpoint, and pickle stores a shared object once (a copy per agent of a default env's 128 would
        # take 0.9 MB in each connector's file).
        spaces = {policy: agent_spaces(self.spec_.num_patches, self.spec_.num_features[policy])
                  for policy in policies}
        self.observation_spaces = {aid: spaces[policy_for_agent(aid)][0] for aid in self.possible_agents}
        self.action_spaces = {aid: spaces[policy_for_agent(aid)][1] for aid in self.possible_agents}
        self._stream = image_stream_key(config)
        self._rng = np.random.default_rng([self.config["seed"], *self._stream])
        self._upcoming: list[int] | None = None
        self._episode = 0
        self._keys: list[str] = []
        self._ratios: list[float] = []  # per image: its removal ratio in this episode
        self._point: list[dict[str, np.ndarray]] = []  # per image: both agents' features and the live mask
        self._turns: list[str] = []  # the policies still to choose at the current pruning point, in order
        self._chosen: list[dict[str, np.ndarray]] = []  # per image: the bool sets chosen at this point, by policy
        self._instance = f"{id(self):x}-{time.monotonic_ns():x}"

    # -- server access -------------------------------------------------------------------------------

    def _lookup_server(self) -> ray.actor.ActorHandle:
        """The server actor by its name, waiting (up to ``server_timeout_s``) until it is registered."""
        name = self._server_name
        return call_through_restarts(lambda: ray.get_actor(name, namespace=NAMESPACE),
                                     float(self.config["server_timeout_s"]), retry_on=(ValueError,),
                                     failure=f"no ViT server named {name!r} in namespace {NAMESPACE!r}")

    def _call(self, method: str, *args: object) -> Any:
        """Call the server; if its actor died, wait (up to ``server_timeout_s``) for Ray's restart and retry."""
        if not isinstance(self._server, ray.actor.ActorHandle):
            return getattr(self._server, method)(*args)  # an in-process engine (env_config["server"])

        def look_up_again() -> None:
            self._server = self._lookup_server()
        return call_through_restarts(lambda: ray.get(getattr(self._server, method).remote(*args)),
                                     float(self.config["server_timeout_s"]), look_up_again)

    # -- episode -------------------------------------------------------------------------------------

    def _zero_observations(self) -> dict:
        """Final observations (RLlib wants one per agent when the episode ends; nothing reads them)."""
        return {aid: {k: np.zeros(space.shape, np.float32) for k, space in self.observation_spaces[aid].items()}
                for aid in self.agents}

    def _turn_observations(self, policy: str) -> dict:
        """The observations of the agents of ``policy`` for their turn at the current pruning point: their
        features, the tokens they choose from (for the similarity agents, those the attention agents did not
        keep) and how many to choose (:func:`~policies.decisions.turn_counts`)."""
        out, problem = {}, self.problem
        for i, point in enumerate(self._point):
            live = point["live"] > 0.5
            counts = dict(zip(POLICIES, turn_counts(int(live.sum()), self._ratios[i], problem.agents,
                                                 problem.protected_share), strict=True))
            options = live if policy == "attention" else choosable(live, self._chosen[i].get("attention"))
            out[self._agent(i, policy)] = {"tokens": point[policy], "live": options.astype(np.float32),
                                           "count": np.array([counts[policy]], np.float32)}
        return out

    def _start_point(self, points: list[dict[str, np.ndarray]]) -> dict:
        """Begin the turns at a pruning point with the server's observations ``points`` (one per image); returns
        the observations of whoever chooses first."""
        self._point = points
        self._chosen = [{} for _ in points]
        self._turns = list(trained_policies(self.problem.agents))
        return self._turn_observations(self._turns[0])

    def _draw_images(self) -> list[int]:
        """The next episode's images: ``images_per_env / rollouts_per_image`` draws, each repeated for its rollouts."""
        rollouts = self.problem.rollouts_per_image
        return np.repeat(self._rng.integers(0, self.spec_.num_images, self.num_images // rollouts), rollouts).tolist()

    def _draw_ratios(self) -> list[float]:
        """The removal ratio of each image of the episode, one draw per image shared by its rollouts; no draw
        when the problem trains at one ratio."""
        ratios, rollouts = self.problem.ratios_trained, self.problem.rollouts_per_image
        if len(ratios) == 1:
            return [ratios[0]] * self.num_images
        return np.repeat(self._rng.choice(ratios, self.num_images // rollouts), rollouts).tolist()

    @override(MultiAgentEnv)
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
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
        self._ratios = self._draw_ratios()
        self.agents = list(self.possible_agents)
        try:
            started = self._call("reset", self._keys, indices, self._upcoming, self._ratios)
        except (DataError, ray.exceptions.RayTaskError) as error:
            cause = remote_cause(error)
            if not isinstance(cause, DataError):
                raise
            # under RLlib, which resets a failed env again at once, without end, and logs each failure: wait for
            # train.py's driver to stop the run on it (training.console.StopOnDataError), not flood the terminal
            time.sleep(float(self.config["data_error_wait_s"]))
            raise cause from None
        obs = self._start_point(started)
        return obs, {aid: {} for aid in obs}

    @override(MultiAgentEnv)
    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        policy = self._turns.pop(0)
        for i, chosen in enumerate(self._chosen):
            chosen[policy] = np.asarray(action_dict[self._agent(i, policy)]).astype(bool)  # MultiBinary 0/1
        if self._turns:
            return self._turn_observations(self._turns[0]), {}, {"__all__": False}, {"__all__": False}, {}
        survivors = [survives(point["live"] > 0.5, chosen.get("attention"), chosen.get("similarity"))
                     for point, chosen in zip(self._point, self._chosen, strict=True)]
        try:
            results = self._call("step", self._keys, survivors)
        except (EpisodeLost, ray.exceptions.RayTaskError) as error:
            if not isinstance(remote_cause(error), EpisodeLost):
                raise
            raise self._episode_lost() from None
        if not results[0]["done"]:
            obs = self._start_point([result["obs"] for result in results])
            # an agent that acted and observes again at once (one agent alone, --agents attention or similarity)
            # gets its reward so far, 0, as RLlib's episodes require; with both, the agent observing has not acted
            rewards = {aid: 0.0 for aid in obs if policy_for_agent(aid) == policy}
            return obs, rewards, {"__all__": False}, {"__all__": False}, {}
        problem = self.problem
        reached = np.array([fidelity(problem, result["agree"], result["prob_unpruned_class"]) for result in results])
        if problem.reward_baseline == "rollouts":
            baselines = leave_one_out_means(reached, problem.rollouts_per_image)
        elif problem.reward_baseline != "none":
            baselines = np.array([fidelity(problem, result["baseline_agree"], result["baseline_prob_unpruned_class"])
                                  for result in results])
        else:
            baselines = np.zeros_like(reached)
        rewards, infos = {}, {}
        for i, (result, reward) in enumerate(zip(results, reached - baselines, strict=True)):
            info = {k: result[k] for k in ("kept", "agree", "correct", "prob_unpruned_class", "kept_per_stage",
                                          "gflops_backbone", "gflops_features")}
            info.update(keep_ratio=result["kept"] / self.spec_.num_patches, image=self._images[i],
                        target_ratio=self._ratios[i])
            for aid in self._image_agents[i]:
                rewards[aid] = float(reward)
                infos[aid] = info
        self._keys = []
        terminateds = {aid: True for aid in self.agents} | {"__all__": True}
        truncateds = {aid: False for aid in self.agents} | {"__all__": False}
        return self._zero_observations(), rewards, terminateds, truncateds, infos

    def _agent(self, image: int, policy: str) -> str:
        """The agent of ``policy`` on image ``image`` (``attention_3``, or ``attention`` with one image); only a
        policy that acts in this problem is asked for."""
        return next(aid for aid in self._image_agents[image] if policy_for_agent(aid) == policy)

    def _episode_lost(self) -> StepFailedRecreateEnvError:
        """The server lost our episodes (a restart): RLlib discards this episode (nothing of it is trained on),
        recreates the env and resets (``restart_failed_sub_environments``)."""
        global _episodes_lost
        _episodes_lost += 1
        self._keys = []
        return StepFailedRecreateEnvError("the ViT server lost this episode (it restarted); discarding it")
