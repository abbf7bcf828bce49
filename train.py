"""Train the attention and similarity agents with RLlib PPO (new API stack), run by Ray Tune.

    python train.py --data-dir ../shared/data                    # default run: 18 min of training
    python train.py --target-ratio 0.3,0.5,0.7                   # a sweep: one trial per budget
    python train.py --num-workers 4 --time-budget 0 --iterations 2000   # longer, more env runners
    python train.py --address auto --num-workers 16 --output-dir s3://bucket/runs/marl   # a Ray cluster
    python train.py --output-dir runs/marl --resume              # continue every trial of a run

Each trial is one PPO run on one pruning problem, with its own ViT servers; a number setting given several
comma-separated values (``--target-ratio 0.3,0.5``) makes one trial per combination, run in parallel when
the cluster has room. Sampling uses the ``train`` split; every ``--checkpoint-every`` iterations and at the
end the policies are scored in the mode evaluate.py reports as ``MARL exact`` on a fixed subset of the
``val`` split, and a checkpoint is written; Tune keeps the best ``--keep-checkpoints`` by the
exact-budget accuracy (and the latest), retries a failed trial from its latest checkpoint, and logs every
result (``progress.csv``, ``result.json``, TensorBoard) in the trial's directory under ``--output-dir``.
It ends naming each trial's best checkpoint and the command that evaluates it. The test split is never read
here. ``python train.py --help`` lists every setting of the pruning problem (``envs/problem.py``) with its doc.

What to expect from the default run on a 2-core CPU: 90-180 PPO iterations in its 18 minutes (the machines
here differ by up to 2x), and an exact-budget validation accuracy of 82-84% on its 1,000 validation images at
every checkpoint, level with the heuristics (greedy similarity 82.7%, Distinctive NMS 82.9%): PPO has not yet
learned to beat them (README, "Results").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import functools
import logging
import os
import pickle
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import torch
from ray import tune
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.env_runner_group import EnvRunnerGroup
from ray.rllib.utils.metrics import EVALUATION_RESULTS
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE
from ray.tune.utils import flatten_dict

from cli import (
    OneLineParser,
    add_data_access_arguments,
    check_output_dir,
    data_access,
    given_flags,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_command,
)
from envs.atomic_file import first_missing, replaced_atomically
from envs.episode_metrics import PruningMetrics
from envs.problem import (
    PruningProblem,
    add_problem_arguments,
    flag_name,
    problems_from_args,
    sweep_label,
    trained_policies,
)
from envs.pruning_env import TokenPruningEnv, env_steps_per_episode, policy_for_agent
from envs.vit.backbone_checkpoint import NOT_A_CLONE, installed_without_repository, normalize
from envs.vit_server import (
    NAMESPACE,
    ServerInputs,
    ServerSettings,
    call_through_restarts,
    load_server_inputs,
    staged_from_weights,
    start_vit_servers,
)
from policies.checkpoints import (
    PREFIX,
    UNRECORDED,
    CheckpointInfo,
    PolicyCheckpointError,
    check_policies,
    check_restorable,
    checkpoint_number,
    load_policies,
    read_checkpoint_info,
    readable_checkpoint_info,
    stage_checkpoint,
    trial_checkpoints,
    validation_rank,
)
from policies.rl_module import TokenPolicyModule
from policies.sample_ahead import SampleAheadPPO
from policies.warm_start import warm_start_modules

REPO = Path(__file__).resolve().parent
TRAIN_SERVER, VAL_SERVER = "vit_server_train", "vit_server_val"
SCORE = "val_score"  # the reported metric checkpoints are ranked by: see validation_score


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--num-workers", type=non_negative_int, default=2,
                     help="env runners per trial (0 = sample in the trial's own process, for debugging; default 2)")
    run.add_argument("--envs-per-worker", type=positive_int, default=1,
                     help="pruning envs each env runner steps in one batch (default 1)")
    run.add_argument("--sample-ahead", action=argparse.BooleanOptionalAction, default=True,
                     help="the env runners sample the next batch while the learner updates on this one, with the "
                          "policy of one update earlier (PPO's ratio is to the policy that sampled); "
                          "--no-sample-ahead: RLlib's PPO, which alternates the two")
    run.add_argument("--iterations", type=positive_int, default=1000,
                     help="stop a trial after this many iterations in total (default 1000; raise it on --resume to go "
                          "on)")
    run.add_argument("--time-budget", type=non_negative_float, default=18.0, metavar="MINUTES",
                     help="stop a trial (with a checkpoint) after the iteration that passes this much training "
                          "time since it (re)started; 0 = no limit (default 18, so the default run fits in ~20 min)")
    run.add_argument("--output-dir", default="runs/marl",
                     help="the run's directory, local or a cloud URI (s3://, gs://): a cluster needs no shared disk "
                          "(default runs/marl)")
    run.add_argument("--keep-checkpoints", type=positive_int, default=3,
                     help="checkpoints kept per trial: the best by validation score, and always the latest "
                          "(default 3)")
    run.add_argument("--max-failures", type=non_negative_int, default=2,
                     help="times a failed trial is restarted from its latest checkpoint (default 2)")
    run.add_argument("--resume", action="store_true",
                     help="continue every trial of the run in --output-dir from its latest checkpoint, with its "
                          "problem and resources; --iterations and --time-budget are taken from this command")
    run.add_argument("--from-checkpoint", default=None, metavar="CHECKPOINT",
                     help="start a new run from a checkpoint: its problem and PPO settings, weights, optimiser "
                          "state and iteration count (e.g. to go on with more env runners)")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir holds a run")
    run.add_argument("--address", default=None, help="join a Ray cluster (e.g. 'auto'); default: start a local one")
    run.add_argument("--num-cpus", type=positive_int, default=None,
                     help="CPUs of a local Ray instance (default: this machine's; raised to what one trial "
                          "reserves)")
    run.add_argument("--servers", type=positive_int, default=None,
                     help="ViT servers per trial, the env runners spread over them by index (default: one per "
                          "GPU of the cluster, one without GPUs)")
    run.add_argument("--server-threads", type=positive_int, default=1,
                     help="torch threads of each ViT server, and the CPUs it reserves (default 1)")
    add_data_access_arguments(run)
    add_problem_arguments(p, "pruning problem (comma-separated numbers sweep; taken from the run on --resume "
                             "and from the checkpoint with --from-checkpoint, --data-dir aside)")
    # Every problem and PPO flag defaults to None, "not given" (add_problem_arguments), so that with_data_dir
    # overrides a run's data directory only if given, and with_backbone_data takes the backbone's data set and
    # held-out split unless given. (Which flags --resume and --from-checkpoint refuse comes from
    # cli.given_flags, which also sees a flag given with its default value.)
    return p


RECORDED_RUN_FLAGS: tuple[str, ...] = ("num_workers", "envs_per_worker", "sample_ahead", "servers", "server_threads",
                                       "keep_checkpoints", "max_failures")
"""The run flags a run records and ``--resume`` keeps: the trials' resources and Tune's checkpoint and failure
settings."""


def flags_kept_on(given: Collection[str], resume: bool) -> list[str]:
    """Of the flags ``given`` on the command line, those that ``--resume`` (``resume``) or ``--from-checkpoint``
    take from the run or the checkpoint instead: every problem and PPO flag but ``--data-dir`` (where the data is,
    not what the agents learn), and on ``--resume`` the :data:`RECORDED_RUN_FLAGS`."""
    kept = [flag_name(dest.split(".", 1)[1]) for dest in given
            if dest.startswith(("problem.", "ppo.")) and dest != "problem.data_dir"]
    if resume:
        kept += [flag_name(dest) for dest in given if dest in RECORDED_RUN_FLAGS]
    return sorted(kept)


# -- where things run --------------------------------------------------------------------------------------

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


def plan_placement(servers: int | None, server_threads: int, cluster_gpus: float, driver_has_gpu: bool) -> Placement:
    """Without GPUs everything runs on CPUs, the learner in the trial's process. With GPUs there is one server
    per GPU unless ``servers`` says otherwise; the learner takes half a GPU: in the trial's process when the
    machine that starts it has one, else as a learner actor that Ray places on a GPU node (RLlib's device check
    fails on a GPU-less process asked for GPUs). Either way RLlib reserves the learner's half GPU in the trial's
    placement group, and the servers, the validation one included, share what it leaves."""
    if cluster_gpus < 1:
        return Placement(servers or 1, 0.0, server_threads, False, 0.0)
    count = servers or int(cluster_gpus)
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
        """A run recorded before ``sample_ahead`` existed alternated sampling and updates, and goes on so."""
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


def start_ray(args: argparse.Namespace, reserved_cpus: float) -> None:
    """A local Ray instance with at least the CPUs one trial reserves, or the cluster at --address with this
    repo shipped to every node.

    The console shows our progress lines and Ray's errors: worker and actor output reaches the terminal
    (a crashing env runner or server prints its traceback), while Ray's and RLlib's own warnings, all
    internal to them at start (token auth notice, RLModuleConfig and new-API-stack deprecations, gputil),
    are kept to the session logs under /tmp/ray. One line stays: the core worker's note that the ViT
    server has constructor arguments in the object store, which it does on purpose (see vit_server.py).
    """
    quiet = {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR"),
             "log_to_driver": True}
    if args.address:
        if installed_without_repository():
            raise ValueError(f"--address {args.address}: {NOT_A_CLONE}")
        runtime_env = {"working_dir": str(REPO),
                       "excludes": [".git/", "runs/", "results/", "data/", ".venv/", "*.safetensors"]}
        ray.init(address=args.address, runtime_env=runtime_env, **quiet)
    else:
        ray.init(address="local", num_cpus=max(args.num_cpus or os.cpu_count() or 1, reserved_cpus),
                 include_dashboard=False, **quiet)
    interrupt_on_sigterm()


def cluster_shortfall(reserved: Mapping[str, float]) -> str | None:
    """A notice where the Ray cluster has fewer resources than one trial ``reserved``: Tune then waits, silently,
    for nodes to join (an autoscaling cluster adds them), so the user learns why nothing happens; None where
    one trial fits."""
    cluster = ray.cluster_resources()
    if all(cluster.get(kind, 0) >= amount for kind, amount in reserved.items()):
        return None

    def listed(resources: Mapping[str, float]) -> str:
        return ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind in reserved)
    return (f"waiting for the cluster: one trial reserves {listed(reserved)} and the cluster has {listed(cluster)}; "
            f"its trials start when nodes join (or pass a smaller --num-workers or --servers)")


def interrupt_on_sigterm() -> None:
    """A SIGTERM (``kill``, a job scheduler) ends the run as Ctrl-C does, with a checkpoint and the line that
    says how to go on, instead of the handler ``ray.init`` installs, which aborts the driver."""
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))


def quiet_ray_loggers() -> None:
    """Ray's, RLlib's and Tune's own warnings to the session logs (start_ray says which), in this process;
    Tune's progress tables off (its legacy reporter, silent at ``verbose=0``: the new one prints tables even
    then); our progress lines are the console."""
    for logger in ("ray", "ray.rllib", "ray.tune"):  # RLlib's and Tune's loggers have levels of their own
        logging.getLogger(logger).setLevel(logging.ERROR)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


# -- one trial: RLlib's PPO on one problem ------------------------------------------------------------------

def train_server_names(suffix: str, count: int) -> list[str]:
    """The sampling servers' actor names: ``TRAIN_SERVER``, the trial's ``suffix`` and an index."""
    return [f"{TRAIN_SERVER}{suffix}_{index}" for index in range(count)]


def build_config(problem: PruningProblem, resources: TrialResources, train_servers: list[str], val_server: str,
                 initial_states: dict[str, Path] | None = None, resumed_at: int = 0) -> PPOConfig:
    """The whole PPO setup as data: env, the two policies, resources, PPO and validation settings.

    ``initial_states``: module directories (``RLModule.save_to_path``) the policies start from (warm start);
    ``resumed_at``: the iteration of the checkpoint the run goes on from (its envs draw other images than the
    run before it did).
    """
    env_config = {"problem": problem.to_json(), "server_name": train_servers, "seed": problem.seed,
                  "resumed_at": resumed_at}
    policies = trained_policies(problem.agents)
    module_specs = {  # spaces come from the env, per policy
        policy: RLModuleSpec(module_class=TokenPolicyModule, model_config={
            "hidden": problem.hidden, "entropy_gradient": problem.ppo.entropy_coeff > 0})
        for policy in policies}
    return (
        with_resources(PPOConfig(SampleAheadPPO if resources.sample_ahead else PPO), resources)
        .environment(TokenPruningEnv, env_config=env_config, disable_env_checking=True)
        .multi_agent(policies=set(policies), policy_mapping_fn=policy_for_agent, count_steps_by="agent_steps")
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=module_specs))
        .env_runners(rollout_fragment_length="auto", sample_timeout_s=600.0)
        .training(**asdict(problem.ppo))
        .callbacks(PruningMetrics, on_algorithm_init=functools.partial(restore_initial_states,
                                                                        initial_states=initial_states or {}))
        .evaluation(evaluation_interval=problem.checkpoint_every, evaluation_num_env_runners=0,
                    custom_evaluation_function=functools.partial(
                        validate_on_server, server_name=val_server, model_config={"hidden": problem.hidden},
                        steps_per_image=env_steps_per_episode(problem)))
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=1000,
                         delay_between_env_runner_restarts_s=5.0, restart_failed_sub_environments=True)
        .debugging(seed=problem.seed, log_level="ERROR")  # RLlib's start-up notices: see start_ray
    )


def server_settings(problem: PruningProblem, placement: Placement, access: dict) -> dict[str, ServerSettings]:
    """Servers on the train split for sampling, one on a val subset for checkpoint selection, with the
    resources the placement gives them (the validation server reserves no CPU: see trial_resources). The
    validation server comes first, so that a validation split holding the backbone's training images is
    refused before the train split's minutes of decoding."""
    train = ServerSettings(problem, split="train", limit=problem.train_limit, num_gpus=placement.server_gpus,
                           num_cpus=placement.server_cpus, torch_threads=int(placement.server_cpus), **access)
    return {VAL_SERVER: replace(train, split="val", limit=problem.val_limit, num_cpus=0), TRAIN_SERVER: train}


def restore_initial_states(algorithm: Algorithm, *, initial_states: dict[str, Path], **_) -> None:
    """RLlib's ``on_algorithm_init`` hook: load each warm-started module into the learner, the documented
    ``restore_from_path(..., component=...)`` way, then hand the weights to the env runners."""
    for policy, path in initial_states.items():
        algorithm.restore_from_path(str(path), component="/".join(
            (COMPONENT_LEARNER_GROUP, COMPONENT_LEARNER, COMPONENT_RL_MODULE, policy)))
    if initial_states:
        algorithm.env_runner_group.sync_weights(from_worker_or_learner_group=algorithm.learner_group,
                                                inference_only=True)


def validate_on_server(algorithm: Algorithm, eval_env_runner_group: EnvRunnerGroup, *, server_name: str,
                       model_config: dict, steps_per_image: int) -> tuple[dict[str, float], int, int]:
    """RLlib's custom evaluation: the learner's current weights, scored by the ViT server that holds the
    validation images in the exact-budget mode that evaluate.py reports (``PruningEngine.validate``); every
    validation image counts, every time. The scores land in the results under ``evaluation``. The step counts
    returned are what stepping those images through the env would have been: an env step per turn
    (``env_steps_per_episode`` per image), each the one acting agent's step."""
    server = ray.get_actor(server_name, namespace=NAMESPACE)
    policies = list(algorithm.config.policies)
    weights = algorithm.learner_group.get_weights(module_ids=policies)
    metrics = call_through_restarts(lambda: ray.get(server.validate.remote(weights, model_config)))
    for name, value in metrics.items():
        algorithm.metrics.log_value((EVALUATION_RESULTS, name), value, reduce="item")
    env_steps = call_through_restarts(lambda: ray.get(server.spec.remote())).num_images * steps_per_image
    return metrics, env_steps, env_steps


def imitate_heuristic(problem: PruningProblem, inputs: ServerInputs, directory: Path, trial: str) -> dict[str, Path]:
    """The warm start (policies/warm_start.py): the modules fitted to the heuristics on a seeded subset of the
    train split, saved under ``directory``; returns each policy's path."""
    started = time.time()
    staged = staged_from_weights(inputs.state, inputs.config, problem.prune_points)
    chosen = torch.randperm(len(inputs.images), generator=torch.Generator().manual_seed(problem.seed))
    images = normalize(inputs.images[chosen[:problem.warm_start_images]], inputs.config)
    fitted = warm_start_modules(staged, images, problem.ratios_trained, problem.reduction, problem.warm_start,
                                problem.agents, problem.protected_share, {"hidden": problem.hidden},
                                problem.warm_start_steps, directory, problem.seed)
    imitated = {"attention": "greedy attention", "similarity": problem.warm_start}
    matches = ", ".join(f"{policy} agent imitates {imitated[policy]} ({agreement:.1%} of its choices match)"
                        for policy, (_, agreement) in fitted.items())
    print(f"[{trial}] warm start on {len(images)} train images: {matches}, in {time.time() - started:.0f} s",
          flush=True)
    return {policy: path for policy, (path, _) in fitted.items()}


@dataclass(frozen=True)
class StopRule:
    """When a trial stops; given anew by each command, ``--resume`` included."""

    iterations: int
    time_budget_min: float  # 0: no limit


def validation_score(result: dict[str, Any]) -> float | None:
    """The score checkpoints are ranked by: top-1 accuracy of the exact-budget mode (``MARL exact``, what
    ships at the problem's budget) on the validation images."""
    return result.get(EVALUATION_RESULTS, {}).get("exact_accuracy")


def run_trial(config: dict, *, stop: StopRule, access: dict, data_dir: str, run_dir: Path | None,
              inputs: dict[str, ServerInputs] | None = None) -> None:
    """Tune's trainable: one PPO run on one problem with its own ViT servers.

    It goes on from the trial's newest checkpoint when Tune restarts or resumes it
    (:func:`resumable_checkpoints`), else starts from the trial's ``from_checkpoint`` or the warm start; it
    reports every iteration and, every ``checkpoint_every`` iterations and at the stop, a validated
    checkpoint. ``config["trial"]``: the trial's problem, resources and starting checkpoint (build_tuner);
    ``run_dir``: :func:`local_run_dir`, where Tune stores the trial's checkpoints on disk, not the staging
    directory of the trial's context; ``data_dir``: the data directory as the driver resolved it (a trial runs
    in a directory of its own); ``inputs``: the servers' weights and images as the driver read them (loaded
    here if None)."""
    quiet_ray_loggers()
    trial = config["trial"]  # this trial's entry of the grid (build_tuner)
    problem = replace(PruningProblem.from_json(trial["problem"]), data_dir=data_dir)
    resources = TrialResources.from_json(trial["resources"])
    settings = server_settings(problem, resources.placement, access)
    inputs = inputs or {name: load_server_inputs(s) for name, s in settings.items()}
    suffix = f"_{tune.get_context().get_trial_id()}_{uuid.uuid4().hex[:6]}"  # a restarted trial's too
    names = {VAL_SERVER: VAL_SERVER + suffix, TRAIN_SERVER: train_server_names(suffix, resources.placement.servers)}
    train_bundles, val_bundle = server_bundles(resources)
    servers = [*start_vit_servers(settings[TRAIN_SERVER], names[TRAIN_SERVER], inputs[TRAIN_SERVER], train_bundles),
               *start_vit_servers(settings[VAL_SERVER], [names[VAL_SERVER]], inputs[VAL_SERVER], [val_bundle])]
    try:
        with contextlib.ExitStack() as downloads:  # a checkpoint from cloud storage stays on disk until the end
            trial_dir = run_dir / trial["name"] if run_dir is not None else None
            recorded = tune.get_checkpoint()
            own = resumable_checkpoints(trial_dir, recorded, downloads)
            start = [Path(trial["from_checkpoint"])] if trial["from_checkpoint"] else []
            initial_states = {}
            if not own and not start and problem.warm_start != "none":
                clones = Path(tune.get_context().get_trial_dir(), "warm_start")  # staged there, Tune stores it
                initial_states = imitate_heuristic(problem, inputs[TRAIN_SERVER], clones, trial["name"])
            algo = build_config(problem, resources, names[TRAIN_SERVER], names[VAL_SERVER], initial_states,
                                resumed_iteration(own or start)).build_algo()
            try:
                restore_newest(algo, own or start)
                set_aside_unrecorded(trial_dir, recorded)
                train_until(algo, problem, stop)
            finally:
                algo.stop()
    finally:
        for server in servers:
            ray.kill(server, no_restart=True)


def resumable_checkpoints(trial_dir: Path | None, recorded: tune.Checkpoint | None,
                          downloads: contextlib.ExitStack) -> list[Path]:
    """What a restarted or resumed trial may go on from, newest first: its checkpoints in ``trial_dir`` (where
    Tune stores them, on a local disk or a shared one; None for cloud storage), then the one Tune recorded last
    when it is elsewhere, downloaded for as long as ``downloads`` stays open. The disk comes first because Tune
    saves its record of a run only every 10 s or more: after a SIGKILL the record can name a checkpoint older
    than the newest, even one its rotation has deleted since."""
    found = list(reversed(trial_checkpoints(trial_dir))) if trial_dir is not None else []
    if recorded is not None and (trial_dir is None or not Path(recorded.path).is_relative_to(trial_dir)):
        found.append(Path(downloads.enter_context(recorded.as_directory())))
    return found


def set_aside_unrecorded(trial_dir: Path | None, recorded: tune.Checkpoint | None) -> None:
    """Rename the trial's checkpoint directories that Tune has no record of (stored after it last saved its record,
    before a SIGKILL) out of Tune's numbering, which goes on from its record and would write later iterations
    into them. They stay what a later resume may go on from (:func:`trial_checkpoints`); one set aside before
    under the same name holds an older iteration and is replaced."""
    if trial_dir is None:
        return
    recorded_here = recorded is not None and Path(recorded.path).parent == trial_dir
    last_recorded = checkpoint_number(Path(recorded.path)) if recorded_here else -1
    for checkpoint in trial_dir.glob(f"{PREFIX}*"):
        number = checkpoint_number(checkpoint)
        if number is not None and number > last_recorded:
            aside = checkpoint.with_name(UNRECORDED + checkpoint.name)
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)


def resumed_iteration(checkpoints: list[Path]) -> int:
    """The iteration of the newest of ``checkpoints`` (a trial's own, or ``--from-checkpoint``'s) whose record
    reads (0 without checkpoints): the key of the image streams of a run that goes on from it, so that they
    draw other images than the run that wrote it drew from its start. It is the iteration restored unless that
    checkpoint then fails to restore and :func:`restore_newest` falls back to an older one."""
    for checkpoint in checkpoints:
        with contextlib.suppress(PolicyCheckpointError):  # an unreadable record is passed over
            return read_checkpoint_info(checkpoint).iteration or 0
    return 0


def restore_newest(algo: Algorithm, checkpoints: list[Path]) -> None:
    """The whole algorithm state (weights, optimiser, iteration count) from the first of ``checkpoints``
    that restores (a checkpoint cut short by a crash while it was stored does not), on every runner."""
    for checkpoint in checkpoints:
        try:
            algo.restore_from_path(str(checkpoint.resolve()))
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint can fail in many ways
            fallback = "; trying an older one" if checkpoint != checkpoints[-1] else ""
            print(f"cannot restore {checkpoint} ({type(error).__name__}: {error}){fallback}", flush=True)
            continue
        # restore pushes weights to remote runners without waiting; make sure they have them
        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True,
                                           timeout_seconds=60)
        print(f"resumed from {checkpoint} at iteration {algo.iteration}", flush=True)
        return
    if checkpoints:
        raise PolicyCheckpointError(f"none of {', '.join(map(str, checkpoints))} restores")


def train_until(algo: Algorithm, problem: PruningProblem, stop: StopRule) -> None:
    """The PPO loop: train and report each iteration; validate and checkpoint every K iterations and at the
    stop (Tune ranks the checkpoints by :data:`SCORE`)."""
    began, first = time.time(), algo.iteration
    while algo.iteration < stop.iterations:
        result = algo.train()
        validated = algo.iteration % problem.checkpoint_every == 0  # evaluation_interval == checkpoint_every
        elapsed = time.time() - began
        out_of_time = stop.time_budget_min > 0 and elapsed > 60 * stop.time_budget_min
        final = algo.iteration >= stop.iterations or out_of_time
        if final and not validated:
            result[EVALUATION_RESULTS] = algo.evaluate()
        remaining = (stop.iterations - algo.iteration) * elapsed / (algo.iteration - first)
        if stop.time_budget_min > 0:
            remaining = max(0.0, min(remaining, 60 * stop.time_budget_min - elapsed))
        result["progress"] = {"elapsed_s": elapsed, "remaining_s": 0.0 if final else remaining,
                              "validated": validated or final, "out_of_time": out_of_time}
        result[SCORE] = validation_score(result) if validated or final else None  # a column from the first row on
        if validated or final:
            with tempfile.TemporaryDirectory(prefix="marl_checkpoint_") as staging:
                stage_checkpoint(algo, staging, CheckpointInfo(problem, algo.iteration, result[SCORE]))
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(staging))
        else:
            tune.report(result)
        if out_of_time:
            break


# -- the run: trials under Tune -------------------------------------------------------------------------------

def progress_line(result: dict[str, Any], problem: PruningProblem) -> str:
    """One compact line per iteration; returns are per image (an env episode carries several images), left out
    with the ``rollouts`` baseline, against which they average 0 by construction (against a heuristic they are
    above 0 where the agents beat it); ``remaining``: time until --iterations or --time-budget ends the trial,
    whichever comes first."""
    runners = result.get("env_runners", {})
    returns = {} if problem.reward_baseline == "rollouts" else runners.get("module_episode_returns_mean", {})
    progress = result["progress"]
    parts = [f"iter {result['training_iteration']:4d}",
             f"steps {result.get('num_env_steps_sampled_lifetime', 0):>8}",
             *(f"R/img[{m[:3]}]={v / problem.images_per_env:+.3f}" for m, v in sorted(returns.items())),
             f"agree {100 * runners.get('agree', float('nan')):5.1f}%",
             f"acc {100 * runners.get('correct', float('nan')):5.1f}%",
             f"kept {runners.get('keep_ratio', float('nan')):.3f}",
             f"GFLOPs {runners.get('gflops', float('nan')):.4f} w/o policies",  # evaluate.py's count them
             f"{duration(progress['elapsed_s']):>6} elapsed, {duration(progress['remaining_s']):>6} left"]
    if progress["validated"]:  # results carry the last validation along; show it only where it ran
        val = result.get(EVALUATION_RESULTS, {})
        parts.append(f"| val exact {val.get('exact_accuracy', float('nan')):.2f}% "
                     f"(agree {val.get('exact_agreement', float('nan')):.2f}%)")
    if progress["out_of_time"]:
        parts.append("| time budget reached")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``125`` -> ``2m05s``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class ProgressLines(tune.Callback):
    """The console: one :func:`progress_line` per trial iteration, led by the trial's name when there are
    several (Tune's own reporter is off: ``RunConfig(verbose=0)``)."""

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        problem = PruningProblem.from_json(trial.config["trial"]["problem"])
        name = f"[{trial.config['trial']['name']}] " if len(trials) > 1 else ""
        print(name + progress_line(result, problem), flush=True)


class ProgressCsv(CSVLoggerCallback):
    """Tune's ``progress.csv`` with a column for every metric any row reports. Tune's own logger takes the first
    row's columns and drops the others, so validation (not in iteration 1's row) and the episode metrics of an
    iteration that finished no episode would never become columns, and on a resume it writes the new run's
    columns under the old header, which pandas cannot read. Here a row that brings new metrics rewrites the file
    under the union of the columns (rarely: new metrics appear in the first few rows), the earlier rows blank in
    them."""

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        if trial not in self._trial_files:
            self._setup_trial(trial)
        row = flatten_dict({key: value for key, value in result.items() if key != "config"}, delimiter="/")
        path = Path(trial.local_path, EXPR_PROGRESS_FILE)
        writer = self._trial_csv[trial]
        if writer is None or not set(row) <= set(writer.fieldnames):
            with path.open(newline="") as existing:
                reader = csv.DictReader(existing)
                earlier, columns = list(reader), list(reader.fieldnames or [])
            columns += [key for key in row if key not in columns]
            self._trial_files[trial].close()
            with replaced_atomically(path) as staging, staging.open("w", newline="") as rewritten:
                copier = csv.DictWriter(rewritten, columns, extrasaction="ignore")
                copier.writeheader()
                copier.writerows(earlier)
            self._trial_files[trial] = path.open("a", newline="")
            writer = self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], columns)
        writer.writerow(row)
        self._trial_files[trial].flush()


def storage_location(output_dir: str) -> tuple[str, str]:
    """``--output-dir`` as Tune's ``(storage_path, name)``: a cloud URI as it is, a local path made absolute."""
    if "://" in output_dir:
        parent, _, name = output_dir.rstrip("/").rpartition("/")
        return parent, name
    path = Path(output_dir).expanduser().resolve()
    return str(path.parent), path.name


def local_run_dir(output_dir: str) -> Path | None:
    """The run's directory when ``--output-dir`` is a path on this machine (or a disk its nodes share), where
    Tune stores each trial's files in ``<run>/<trial name>``; None for a cloud URI."""
    storage_path, name = storage_location(output_dir)
    return None if "://" in storage_path else Path(storage_path, name)


def build_tuner(args: argparse.Namespace, trainable: Callable[[dict], None], problems: list[PruningProblem],
                resources: TrialResources) -> tune.Tuner:
    """A new run of one trial per problem, or with --resume the run in --output-dir restored: every trial,
    finished ones too, goes on from its latest checkpoint with the problem and resources it started with."""
    storage_path, name = storage_location(args.output_dir)
    trainable = tune.with_resources(trainable, trial_resources(resources))
    if args.resume:
        resume = tune.ResumeConfig.ResumeType.RESUME
        return tune.Tuner.restore(f"{storage_path}/{name}", trainable=trainable,
                                  _resume_config=tune.ResumeConfig(finished=resume, errored=resume))
    trials = [{"name": sweep_label(p, problems), "problem": p.to_json(), "resources": resources.to_json(),
               "from_checkpoint": args.from_checkpoint and str(Path(args.from_checkpoint).resolve())}
              for p in problems]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: trial.config["trial"]["name"]),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=0, callbacks=[ProgressLines(), ProgressCsv()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=args.keep_checkpoints, checkpoint_score_attribute=SCORE,
                                                    checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=args.max_failures)),
    )


def planned_trials(args: argparse.Namespace, given: Collection[str]) -> tuple[list[PruningProblem], TrialResources]:
    """The problems and resources of the trials: from the flags (or ``--from-checkpoint``'s problem) for a new
    run, from the run's own record on --resume; a flag ``given`` that either would ignore is refused. The
    placement is this machine's guess until Ray is up."""
    storage_path, name = storage_location(args.output_dir)
    local = local_run_dir(args.output_dir)
    if local is not None:
        check_output_dir(local, args.output_dir)
    if args.resume and (args.from_checkpoint or args.overwrite):
        other = "--from-checkpoint starts a new one" if args.from_checkpoint else "--overwrite replaces it"
        raise ValueError(f"--resume continues a run; {other}: pass one of them")
    kept = flags_kept_on(given, args.resume)
    if (args.resume or args.from_checkpoint) and kept:
        source = ("run's problems, PPO settings and resources (--from-checkpoint starts a new run that may change "
                  "them)" if args.resume else "checkpoint's problem and its PPO settings")
        raise ValueError(f"{'--resume' if args.resume else '--from-checkpoint'} goes on with the {source}: drop "
                         f"{', '.join(kept)}")
    if args.resume:
        if not tune.Tuner.can_restore(f"{storage_path}/{name}"):
            raise ValueError(f"nothing to resume: no run in {args.output_dir}")
        try:  # Tune's records, read by Tuner.restore once Ray is up: a damaged one is refused now
            if local is not None:
                with (local / "tuner.pkl").open("rb") as file:
                    pickle.load(file)
            trials = [trial.config["trial"] for trial in tune.ExperimentAnalysis(f"{storage_path}/{name}").trials]
        except Exception as error:  # noqa: BLE001 - a damaged record fails in many ways
            raise ValueError(f"the run's Tune records in {args.output_dir} (tuner.pkl, experiment_state-*.json) do "
                             f"not read ({type(error).__name__}: {error}): start a new run from its newest "
                             f"checkpoint with --from-checkpoint and another --output-dir") from None
        reached = [resumed_iteration(list(reversed(trial_checkpoints(local / trial["name"])))) for trial in trials
                   ] if local is not None else []
        if reached and min(reached) >= args.iterations:
            raise ValueError(f"every trial of the run is at iteration {min(reached)} or later and --iterations counts "
                             f"them in total: pass more than {max(reached)} to go on")
        return (with_data_dir([PruningProblem.from_json(t["problem"]) for t in trials], args),
                TrialResources.from_json(trials[0]["resources"]))
    if local is not None and local.exists() and any(local.iterdir()):
        if not tune.Tuner.can_restore(str(local)):
            raise ValueError(f"{args.output_dir} is not empty and holds no run: choose another --output-dir")
        if not args.overwrite:
            raise ValueError(f"{args.output_dir} already holds a run; pass --resume to continue it or --overwrite "
                             f"to replace it")
    if args.from_checkpoint:
        info = read_checkpoint_info(Path(args.from_checkpoint))
        if info.iteration is not None and args.iterations <= info.iteration:
            raise ValueError(f"--from-checkpoint is at iteration {info.iteration} and --iterations counts them in "
                             f"total: pass more than {info.iteration}")
        check_restorable(args.from_checkpoint)
        problems = [info.problem]
    else:
        problems = with_backbone_data(problems_from_args(args), args)
        labels = [sweep_label(problem, problems) for problem in problems]
        if len(set(problems)) < len(problems):
            raise ValueError("the sweep gives a setting the same value twice: give each value once")
        if len(set(labels)) < len(labels):
            raise ValueError(f"two trials of the sweep would share the name {max(labels, key=labels.count)} (values "
                             f"equal to 6 significant digits): give values that differ more")
    placement = plan_placement(args.servers, args.server_threads, torch.cuda.device_count(), torch.cuda.is_available())
    return (with_data_dir(problems, args),
            TrialResources(args.num_workers, args.envs_per_worker, placement, args.sample_ahead))


def with_backbone_data(problems: list[PruningProblem], args: argparse.Namespace) -> list[PruningProblem]:
    """New problems on their backbones' data (``PruningProblem.on_backbone_data``); ``--dataset``, ``--val-size``
    and ``--split-seed`` given on the command line win."""
    given = [name for name in ("dataset", "val_size", "split_seed") if getattr(args, f"problem.{name}") is not None]
    return [problem.on_backbone_data(given) for problem in problems]


def with_data_dir(problems: list[PruningProblem], args: argparse.Namespace) -> list[PruningProblem]:
    """The problems reading their data from an absolute path (trials run in directories of their own): the
    ``--data-dir`` given on the command line, else the one they name, relative to the working directory. A
    run or checkpoint moved to another machine is pointed at its data so; the data directory is no part of
    what the agents learn."""
    given = getattr(args, "problem.data_dir")
    return [replace(problem, data_dir=str(Path(given or problem.data_dir).expanduser().resolve()))
            for problem in problems]


DATA_SETTINGS = ("backbone", "dataset", "data_dir", "train_limit", "val_size", "split_seed", "val_limit",
                 "prune_points")  # the fields of a problem that decide its servers' weights and images


def read_server_inputs(args: argparse.Namespace, problems: list[PruningProblem],
                       resources: TrialResources) -> dict[str, ServerInputs] | None:
    """The servers' weights and images, read here, so that a bad backbone, data set or ``--from-checkpoint``
    fails before anything starts, and shipped to the trials through Ray's object store when their problems
    differ in no :data:`DATA_SETTINGS` (a sweep of the budget); else None: each trial reads its own."""
    settings = server_settings(problems[0], resources.placement, data_access(args))
    inputs = {name: load_server_inputs(s) for name, s in settings.items()}
    if args.from_checkpoint:  # a checkpoint of another backbone or feature set fails here, clearly
        patches = staged_from_weights(inputs[TRAIN_SERVER].state, inputs[TRAIN_SERVER].config,
                                      problems[0].prune_points).num_patches
        check_policies(load_policies(args.from_checkpoint)[0], patches, args.from_checkpoint)
    shared = all(getattr(p, f) == getattr(problems[0], f) for p in problems for f in DATA_SETTINGS)
    return inputs if shared else None


def train(args: argparse.Namespace, given: Collection[str]) -> tune.ResultGrid:
    """Run (or resume) the trials; uses the Ray instance already initialised in this process, if any. ``given``:
    the flags the command line named (:func:`cli.given_flags`)."""
    run_dir = local_run_dir(args.output_dir)
    if (args.overwrite and args.from_checkpoint and run_dir is not None
            and Path(args.from_checkpoint).expanduser().resolve().is_relative_to(run_dir.resolve())):
        raise ValueError(f"--overwrite would delete --from-checkpoint {args.from_checkpoint} with the run it replaces: "
                         f"copy the checkpoint out of {args.output_dir} first, or pass another --output-dir")
    problems, resources = planned_trials(args, given)
    with run_lock(run_dir):
        inputs = read_server_inputs(args, problems, resources)
        if args.overwrite and run_dir is not None:
            delete_run(run_dir)
        quiet_ray_loggers()
        if not ray.is_initialized():
            start_ray(args, sum(bundle.get("CPU", 0) for bundle in trial_resources(resources).bundles))
        if not args.resume:  # the cluster's GPUs decide the placement
            resources = replace(resources, placement=plan_placement(
                args.servers, args.server_threads, ray.cluster_resources().get("GPU", 0), torch.cuda.is_available()))
        print(resources.placement.describe(resources.num_workers) + f"; {len(problems)} trial(s)", flush=True)
        if (shortfall := cluster_shortfall(trial_resources(resources).required_resources)) is not None:
            print(shortfall, flush=True)
        trainable = tune.with_parameters(run_trial, stop=StopRule(args.iterations, args.time_budget),
                                         access=data_access(args), data_dir=problems[0].data_dir, run_dir=run_dir,
                                         inputs=inputs)
        return build_tuner(args, trainable, problems, resources).fit()


@contextlib.contextmanager
def run_lock(run_dir: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on a local run's directory while this process reads its inputs and trains in it,
    so that a second train.py on the same ``--output-dir`` is refused at once instead of mixing its checkpoints
    into the run's. The lock goes with the process, however it ends. The directories made for it are removed
    again if the run fails or is interrupted before anything is written in them. A cloud ``--output-dir``
    (None) is not locked."""
    if run_dir is None:
        yield
        return
    made = first_missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another train.py is running in {run_dir}: wait for it to end, or pass another "
                             f"--output-dir") from None
        yield
    except BaseException:  # an error or an interrupt (KeyboardInterrupt)
        if made is not None and not any(run_dir.iterdir()):
            shutil.rmtree(made)  # only the empty directories made above
        raise
    finally:
        os.close(descriptor)


RUN_FILES = ("tuner.pkl", "trainable.pkl", ".validate_storage_marker", "experiment_state-*.json",
             "basic-variant-state-*.json")
"""What Tune writes at the top of a run directory, beside a directory per trial."""
TRIAL_FILES = ("params.json", "params.pkl", "progress.csv", "result.json", "events.out.tfevents.*", "error.txt",
               "error.pkl", f"{PREFIX}*", f"{UNRECORDED}{PREFIX}*", "warm_start")
"""What a trial's directory holds: Tune's records and loggers, its checkpoints and the warm start's modules."""


def delete_run(run_dir: Path) -> None:
    """``--overwrite``: delete what the run in ``run_dir`` wrote (:data:`RUN_FILES`, and :data:`TRIAL_FILES` in
    its trials' directories, those holding a ``params.json``), and say what else is kept there."""
    trials = [path.parent for path in run_dir.glob("*/params.json")]
    for directory, patterns in ((run_dir, RUN_FILES), *((trial, TRIAL_FILES) for trial in trials)):
        for path in {match for pattern in patterns for match in directory.glob(pattern)}:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for trial in trials:
        with contextlib.suppress(OSError):  # kept: it holds files of one's own
            trial.rmdir()
    kept = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if not path.is_dir())
    if kept:
        print(f"--overwrite deleted the run in {run_dir} and kept what is not the run's: {', '.join(kept[:5])}"
              + (f" and {len(kept) - 5} more" if len(kept) > 5 else ""), flush=True)


def stored(checkpoint: tune.Checkpoint) -> bool:
    """Whether ``checkpoint`` is still in its storage, local or cloud: after a SIGKILL and --resume, Tune's
    record of a run can name one the killed run's rotation deleted."""
    return checkpoint.filesystem.get_file_info(checkpoint.path).type != pyarrow.fs.FileType.NotFound


def scored_checkpoints(result: tune.Result, run_dir: Path | None) -> list[tuple[str, float, int | None]]:
    """A trial's checkpoints still stored, as ``(name, validation score, iteration)``, those never validated left
    out. On a local disk, every complete checkpoint there, with what it records: those Tune has no record of
    too (set aside on a resume, or stored in an iteration that a Ctrl-C kept from being reported). In cloud
    storage, what Tune recorded with each, so that nothing is downloaded: its ranked checkpoints and the last
    report's, which Tune keeps whatever its score (the stop writes one)."""
    if run_dir is not None:
        trial_dir = run_dir / Path(result.path).name
        return [(path.name, info.val_score, info.iteration) for path in trial_checkpoints(trial_dir)
                if (info := readable_checkpoint_info(path)) is not None and info.val_score is not None]
    latest = [(result.checkpoint, result.metrics)] if result.checkpoint is not None else []
    return [(Path(checkpoint.path).name, metrics[SCORE], metrics.get("training_iteration"))
            for checkpoint, metrics in [*result.best_checkpoints, *latest]
            if metrics.get(SCORE) is not None and stored(checkpoint)]


def closing_lines(results: tune.ResultGrid, output_dir: str) -> tuple[list[str], list[str]]:
    """For each trial, its best checkpoint by validation score among those still stored
    (:func:`scored_checkpoints`), and the command that evaluates it; and one line per trial that failed."""
    lines, errors = [], []
    several = len(results) > 1
    run_dir = local_run_dir(output_dir)
    for result in results:
        if result.config is None:  # a trial that never started (the run was stopped before it)
            lines.append(f"[{Path(result.path or 'trial').name}] " * several + "not started: --resume starts it")
            continue
        name = f"[{result.config['trial']['name']}] " if several else ""
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error  # a RayTaskError wraps the trial's
            message = " ".join(str(cause).split()) or "no details"
            errors.append(f"{name}trial failed: {type(cause).__name__}: {message[:500]} (traceback: "
                          f"{result.path}/error.txt)")
            continue
        scored = scored_checkpoints(result, run_dir)
        if not scored:
            lines.append(f"{name}no checkpoint")
            continue
        checkpoint, score, iteration = max(scored, key=lambda entry: validation_rank(entry[1], entry[2]))
        trial_and_checkpoint = Path(Path(result.path).name, checkpoint)
        problem = PruningProblem.from_json(result.config["trial"]["problem"])
        data_dir = problem.data_dir
        ranking_images = min(problem.val_limit, problem.val_size)  # what the validation server holds
        best = (f"(best on validation: iteration {iteration}, exact-budget accuracy {score:.2f}% on the "
                f"{ranking_images} images that ranked the checkpoints: expect less on others)")
        if run_dir is None:
            lines.append(f"{name}best checkpoint: {output_dir.rstrip('/')}/{trial_and_checkpoint} {best}\n"
                         f"{name}evaluate a local copy of it: python evaluate.py --checkpoint <copy> "
                         f"--data-dir {shlex.quote(data_dir)}")
            continue
        path = run_dir / trial_and_checkpoint
        shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
        lines.append(f"{name}best checkpoint: {shown} {best}\n"
                     f"{name}evaluate it: python evaluate.py --checkpoint {shlex.quote(shown)} --data-dir "
                     f"{shlex.quote(data_dir)}")
    return lines, errors


def interrupted(results: tune.ResultGrid, iterations: int, output_dir: str) -> bool:
    """Whether a trial stopped before its stop rule without an error: the run was interrupted (Ctrl-C), and
    ``--resume`` goes on with it. A trial reached the iteration of its last report or, on a local disk, of its
    newest checkpoint: a trial resumed at its stop reports nothing, nor does one whose last checkpoint was
    stored before a Ctrl-C kept the iteration from being reported."""
    run_dir = local_run_dir(output_dir)
    for result in results:
        if result.error is not None:
            continue
        if result.config is None:
            return True
        metrics = result.metrics or {}
        stored_iterations = [iteration or 0 for _, _, iteration in scored_checkpoints(result, run_dir)]
        reached = max([metrics.get("training_iteration", 0), *stored_iterations])
        if reached < iterations and not metrics.get("progress", {}).get("out_of_time"):
            return True
    return False


def go_on_command(args: argparse.Namespace, given: Collection[str]) -> str:
    """The command that goes on with an interrupted run: ``--resume`` on the cluster and with the stop rule this
    command gave."""
    stop = [f"--{flag.replace('_', '-')}={getattr(args, flag):g}" for flag in ("iterations", "time_budget")
            if flag in given]
    cluster = ["--address", args.address] if args.address else []
    return shlex.join(["python", "train.py", "--output-dir", args.output_dir, "--resume", *cluster, *stop])


def report(results: tune.ResultGrid, args: argparse.Namespace, given: Collection[str]) -> int:
    """Print the run's closing lines; the exit code: 1 where a trial failed, 130 where the run was interrupted."""
    lines, errors = closing_lines(results, args.output_dir)
    print("\n".join(lines))
    for line in errors:
        print("error: " + line, file=sys.stderr)
    if errors:
        return 1
    if interrupted(results, args.iterations, args.output_dir):
        print(f"interrupted: go on with {go_on_command(args, given)}", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    owns_ray = not ray.is_initialized()
    args, given = None, frozenset()

    def run() -> int:
        nonlocal args, given
        parser = build_parser()
        args = parser.parse_args(argv)
        given = given_flags(parser, argv)
        try:
            results = train(args, given)
        finally:
            if owns_ray and ray.is_initialized():
                ray.shutdown()
        return report(results, args, given)

    def interrupted_line() -> str:  # before Tune's loop, which handles the first Ctrl-C itself, or a second one
        run_dir = local_run_dir(args.output_dir) if args is not None else None
        if args is None or run_dir is not None and not any(run_dir.glob("experiment_state-*.json")):
            return ("interrupted before training began: run the command again (with --overwrite if it says the "
                    "output directory holds a run)")
        return f"interrupted: go on with {go_on_command(args, given)}"

    return run_command(run, interrupted_line)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
