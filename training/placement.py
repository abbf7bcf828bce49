"""Where a trial's parts run and what each reserves from Ray: the env runners, the learner and the ViT
servers, one placement group per trial."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ray import tune
from ray.rllib.algorithms.ppo import PPO, PPOConfig


@dataclass(frozen=True)
class Placement:
    """Where the learner and the ViT servers run, and what each reserves from Ray."""

    servers: int  # sampling servers; env runner i uses server i % servers
    server_gpus: float  # GPU share of each server (the validation server's too)
    server_cpus: float  # CPUs each sampling server reserves (its torch threads)
    learner_actor: bool  # the learner runs as its own actor (a GPU elsewhere than the driver) or in the driver
    learner_gpus: float

    def describe(self, num_workers: int) -> str:
        """One line for the console."""
        device = f"{self.server_gpus:g} GPU" if self.server_gpus else f"{self.server_cpus:g} CPU"
        learner = "a learner actor" if self.learner_actor else "the trial's process"
        learner += f" ({self.learner_gpus:g} GPU)" if self.learner_gpus else " (CPU)"
        return (f"placement per trial: {num_workers} env runner(s) over {self.servers} ViT server(s) of {device} "
                f"each, one validation server, the learner in {learner}")


def server_callers(num_workers: int) -> int:
    """How many callers a trial's ViT servers have: its ``num_workers`` env runners (env runner i calls server
    i % servers), or, without remote ones, the trial itself."""
    return max(1, num_workers)


def plan_placement(servers: int | None, server_threads: int, cluster_gpus: float, driver_has_gpu: bool,
                   num_workers: int) -> Placement:
    """Without GPUs everything runs on CPUs, the learner in the trial's process. With GPUs there is one server per
    GPU unless ``servers`` says otherwise, but no more than the env runners call (:func:`server_callers`); the
    learner takes half a GPU: in the trial's process when the machine that starts it has one, else as a learner
    actor that Ray places on a GPU node (RLlib's device check fails on a GPU-less process asked for GPUs). Either
    way RLlib reserves the learner's half GPU in the trial's placement group, and the servers, the validation one
    included, share what it leaves."""
    if cluster_gpus < 1:
        return Placement(servers or 1, 0.0, server_threads, False, 0.0)
    count = servers or min(int(cluster_gpus), server_callers(num_workers))
    learner_gpus = 0.5
    share = min(0.5, (cluster_gpus - learner_gpus) / (count + 1))
    return Placement(count, share, server_threads, not driver_has_gpu, learner_gpus)


@dataclass(frozen=True)
class TrialResources:
    """What each trial runs with; stored in the trial's config, so that ``--resume`` keeps it."""

    num_workers: int
    envs_per_worker: int
    placement: Placement
    sample_ahead: bool  # SampleAheadPPO instead of RLlib's PPO

    def to_json(self) -> dict:
        return {"num_workers": self.num_workers, "envs_per_worker": self.envs_per_worker,
                "placement": asdict(self.placement), "sample_ahead": self.sample_ahead}

    @classmethod
    def from_json(cls, data: dict) -> TrialResources:
        """A run that records no ``sample_ahead`` alternated sampling and updates, and goes on so."""
        return cls(data["num_workers"], data["envs_per_worker"], Placement(**data["placement"]),
                   data.get("sample_ahead", False))


def trial_resources(resources: TrialResources) -> tune.PlacementGroupFactory:
    """The trial's placement group: RLlib's request for PPO (the trial's process with its learner, the env
    runners, a learner actor), then one bundle per sampling server and, with GPUs, one for the validation
    server (:func:`server_bundles`). Without GPUs the validation server reserves nothing: it works between
    sampling rounds, when the env runners wait."""
    rllib = PPO.default_resource_request(with_resources(PPOConfig(), resources))
    placement = resources.placement
    servers = [{"CPU": placement.server_cpus, "GPU": placement.server_gpus}] * placement.servers
    if placement.server_gpus:
        servers.append({"GPU": placement.server_gpus})
    return tune.PlacementGroupFactory([*rllib.bundles, *servers], strategy=rllib.strategy)


def server_bundles(resources: TrialResources) -> tuple[list[int], int]:
    """The bundles of :func:`trial_resources` the sampling servers take, and the validation server's (the
    trial process's own, 0, when it reserves nothing). RLlib puts each env runner in a bundle of its own, so
    a server must not take one of those."""
    total, placement = len(trial_resources(resources).bundles), resources.placement
    first = total - placement.servers - (1 if placement.server_gpus else 0)
    return list(range(first, first + placement.servers)), first + placement.servers if placement.server_gpus else 0


def with_resources(config: PPOConfig, resources: TrialResources) -> PPOConfig:
    """``config`` with the trial's env runners and learner placed."""
    return (config
            .env_runners(num_env_runners=resources.num_workers, num_envs_per_env_runner=resources.envs_per_worker,
                         num_cpus_per_env_runner=1)
            .learners(num_learners=int(resources.placement.learner_actor),
                      num_gpus_per_learner=resources.placement.learner_gpus))
