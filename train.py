"""Train the attention and similarity agents with RLlib PPO (new API stack).

    python train.py --data-dir ../shared/data                    # default run: 18 min of training
    python train.py --num-workers 4 --time-budget 0 --iterations 2000   # longer, more env runners
    python train.py --address auto --num-workers 16              # on a running Ray cluster
    python train.py --output-dir runs/marl --resume              # continue from the latest checkpoint

Sampling uses the ``train`` split; every ``--checkpoint-every`` iterations the policies are scored in the
modes evaluate.py reports (exact budget and per-image counts) on a fixed subset of the ``val`` split, and
the checkpoint with the best exact-budget accuracy is recorded in ``best.json``.
The test split is never read here. ``python train.py --help`` lists every setting of the pruning problem
(``envs/problem.py``) with its doc.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import EVALUATION_RESULTS
from ray.tune.utils import flatten_dict

from cli import OneLineParser, add_data_access_arguments, data_access, non_negative_int, positive_int, versions_line
from envs.episode_metrics import PruningMetrics
from envs.problem import PruningProblem, add_problem_arguments, problem_from_args
from envs.pruning_engine import EngineSpec
from envs.pruning_env import TokenPruningEnv, policy_for_agent, trained_policies
from envs.vit.backbone_checkpoint import CheckpointError, normalize
from envs.vit.data import DataError
from envs.vit_server import (
    NAMESPACE,
    ServerInputs,
    ServerSettings,
    load_server_inputs,
    staged_from_weights,
    start_vit_server,
    start_vit_servers,
)
from policies.checkpoints import (
    CheckpointInfo,
    PolicyCheckpointError,
    check_policies,
    latest_checkpoint,
    list_checkpoints,
    load_policies,
    read_checkpoint_info,
    remove_old_checkpoints,
    write_checkpoint,
)
from policies.decisions import initial_logit_bias
from policies.rl_module import TokenPolicyModule
from policies.warm_start import IMITATION_IMAGES, warm_start_similarity

REPO = Path(__file__).resolve().parent
TRAIN_SERVER, VAL_SERVER = "vit_server_train", "vit_server_val"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--num-workers", type=non_negative_int, default=1,
                     help="env runners (0 = sample in the driver, for debugging)")
    run.add_argument("--envs-per-worker", type=positive_int, default=1)
    run.add_argument("--iterations", type=positive_int, default=1000, help="stop after this many iterations in total")
    run.add_argument("--time-budget", type=float, default=18.0, metavar="MINUTES",
                     help="stop (with a checkpoint) after the iteration that passes this much training time; "
                          "0 = no limit (default 18, so the default run fits in ~20 min)")
    run.add_argument("--output-dir", default="runs/marl")
    run.add_argument("--keep-checkpoints", type=positive_int, default=3)
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue the run in --output-dir (or from the given checkpoint directory)")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir holds a run")
    run.add_argument("--address", default=None, help="join a Ray cluster (e.g. 'auto'); default: start a local one")
    run.add_argument("--num-cpus", type=positive_int, default=None,
                     help="CPUs of a local Ray instance (default: this machine's; raised to what the servers and "
                          "env runners reserve)")
    run.add_argument("--servers", type=positive_int, default=None,
                     help="ViT servers the env runners are spread over, by runner index (default: one per GPU "
                          "of the cluster, one without GPUs)")
    run.add_argument("--server-threads", type=positive_int, default=1,
                     help="torch threads of each ViT server, and the CPUs it reserves")
    add_data_access_arguments(run)
    add_problem_arguments(p, "pruning problem (taken from the checkpoint on --resume)")
    return p


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
        learner = "a learner actor" if self.learner_actor else "the driver"
        learner += f" ({self.learner_gpus:g} GPU)" if self.learner_gpus else " (CPU)"
        return (f"placement: {num_workers} env runner(s) over {self.servers} ViT server(s) of {device} each, "
                f"one validation server, the learner in {learner}")


def plan_placement(servers: int | None, server_threads: int, cluster_gpus: float, driver_has_gpu: bool) -> Placement:
    """Without GPUs everything runs on CPUs, the learner in the driver. With GPUs there is one server per GPU
    unless ``servers`` says otherwise; the learner takes half a GPU: in the driver when the driver has one,
    else as a learner actor that Ray places on a GPU node (RLlib's device check fails on a GPU-less driver
    asked for GPUs). The servers, the validation one included, share what the learner leaves."""
    if cluster_gpus < 1:
        return Placement(servers or 1, 0.0, server_threads, False, 0.0)
    count = servers or int(cluster_gpus)
    reserved_by_learner = 0.0 if driver_has_gpu else 0.5
    share = min(0.5, (cluster_gpus - reserved_by_learner) / (count + 1))
    return Placement(count, share, server_threads, not driver_has_gpu, 0.5)


def build_config(problem: PruningProblem, spec: EngineSpec, num_workers: int, envs_per_worker: int,
                 placement: Placement, initial_states: dict[str, Path] | None = None) -> PPOConfig:
    """The whole PPO setup as data: env, the two policies, resources, PPO and validation settings.

    ``initial_states``: module directories (``RLModule.save_to_path``) the policies start from (warm start).
    """
    env_config = {"problem": problem.to_json(), "server_name": train_server_names(placement.servers),
                  "seed": problem.seed}
    policies = trained_policies(problem.agents)
    module_specs = {  # spaces come from the env, per policy
        policy: RLModuleSpec(module_class=TokenPolicyModule, model_config={
            "hidden": problem.hidden,
            "init_logit_bias": initial_logit_bias(policy, problem.agents, problem.target_ratio, problem.warm_start)})
        for policy in policies}
    return (
        PPOConfig()
        .environment(TokenPruningEnv, env_config=env_config, disable_env_checking=True)
        .multi_agent(policies=set(policies), policy_mapping_fn=policy_for_agent, count_steps_by="agent_steps")
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=module_specs))
        .env_runners(num_env_runners=num_workers, num_envs_per_env_runner=envs_per_worker,
                     rollout_fragment_length="auto", num_cpus_per_env_runner=1, sample_timeout_s=600.0)
        .learners(num_learners=int(placement.learner_actor), num_gpus_per_learner=placement.learner_gpus)
        .training(**asdict(problem.ppo))
        .callbacks(PruningMetrics, on_algorithm_init=functools.partial(restore_initial_states,
                                                                        initial_states=initial_states or {}))
        .evaluation(evaluation_interval=problem.checkpoint_every, evaluation_num_env_runners=0,
                    custom_evaluation_function=functools.partial(
                        validate_on_server, server_name=VAL_SERVER, model_config={"hidden": problem.hidden},
                        steps_per_image=len(problem.prune_points)))
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=1000,
                         delay_between_env_runner_restarts_s=5.0, restart_failed_sub_environments=True)
        .debugging(seed=problem.seed, log_level="ERROR")  # RLlib's start-up notices: see start_ray
    )


def resolve_start(args: argparse.Namespace) -> tuple[Path | None, PruningProblem]:
    """Which checkpoint to continue from (if any) and the problem definition to use."""
    out = Path(args.output_dir)
    existing = list_checkpoints(out)
    if args.resume is None:
        if (existing or (out / "progress.csv").exists()) and not args.overwrite:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        return None, problem_from_args(args)
    checkpoint = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
    if checkpoint is None:
        raise ValueError(f"nothing to resume: no checkpoint in {out / 'checkpoints'}")
    return checkpoint, read_checkpoint_info(checkpoint).problem


def start_ray(args: argparse.Namespace) -> None:
    """A local Ray instance, or the cluster at --address with this repo shipped to every node.

    The console shows our progress lines and Ray's errors: worker and actor output reaches the terminal
    (a crashing env runner or server prints its traceback), while Ray's and RLlib's own warnings, all
    internal to them at start (token auth notice, RLModuleConfig and new-API-stack deprecations, gputil),
    are kept to the session logs under /tmp/ray. One line stays: the core worker's note that the ViT
    server has constructor arguments in the object store, which it does on purpose (see vit_server.py).
    """
    quiet = {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR"),
             "log_to_driver": True}
    for logger in ("ray", "ray.rllib"):  # RLlib's logger has a level of its own
        logging.getLogger(logger).setLevel(logging.ERROR)
    if args.address:
        runtime_env = {"working_dir": str(REPO),
                       "excludes": [".git/", "runs/", "results/", "data/", ".venv/", "*.safetensors"]}
        ray.init(address=args.address, runtime_env=runtime_env, **quiet)
    else:
        placement = plan_placement(args.servers, args.server_threads, torch.cuda.device_count(),
                                   torch.cuda.is_available())
        reserved = placement.servers * placement.server_cpus + args.num_workers  # one CPU per env runner
        ray.init(address="local", num_cpus=max(args.num_cpus or os.cpu_count() or 1, reserved),
                 include_dashboard=False, **quiet)


def train_server_names(count: int) -> list[str]:
    """The sampling servers' actor names."""
    return [f"{TRAIN_SERVER}_{index}" for index in range(count)]


def server_settings(problem: PruningProblem, threads: int, access: dict | None = None) -> dict[str, ServerSettings]:
    """Servers on the train split for sampling, one on a val subset for checkpoint selection; their resources
    come from the :class:`Placement`. The validation server reserves no CPU: it works between sampling
    rounds, when the env runners wait."""
    train = ServerSettings(problem, split="train", limit=problem.train_limit, torch_threads=threads,
                           **(access or {}))
    return {TRAIN_SERVER: train, VAL_SERVER: replace(train, split="val", limit=problem.val_limit, num_cpus=0)}


def restore_initial_states(algorithm, *, initial_states: dict[str, Path], **_) -> None:
    """RLlib's ``on_algorithm_init`` hook: load each warm-started module into the learner, the documented
    ``restore_from_path(..., component=...)`` way, then hand the weights to the env runners."""
    for policy, path in initial_states.items():
        algorithm.restore_from_path(str(path), component="/".join(
            (COMPONENT_LEARNER_GROUP, COMPONENT_LEARNER, COMPONENT_RL_MODULE, policy)))
    if initial_states:
        algorithm.env_runner_group.sync_weights(from_worker_or_learner_group=algorithm.learner_group,
                                                inference_only=True)


def validate_on_server(algorithm, eval_env_runner_group, *, server_name: str, model_config: dict,
                       steps_per_image: int) -> tuple[dict[str, float], int, int]:
    """RLlib's custom evaluation: the learner's current weights, scored by the ViT server that holds the
    validation images in the deterministic modes that evaluate.py reports (``PruningEngine.validate``); every
    validation image counts, every time. The scores land in the results under ``evaluation``. The step counts
    returned are what stepping those images through the env would have been: one env step per pruning point
    and image, one agent step per policy in each."""
    server = ray.get_actor(server_name, namespace=NAMESPACE)
    policies = list(algorithm.config.policies)
    weights = algorithm.learner_group.get_weights(module_ids=policies)
    metrics = ray.get(server.validate.remote(weights, model_config))
    for name, value in metrics.items():
        algorithm.metrics.log_value((EVALUATION_RESULTS, name), value, reduce="item")
    env_steps = ray.get(server.spec.remote()).num_images * steps_per_image
    return metrics, env_steps, env_steps * len(policies)


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``125`` -> ``2m05s``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def progress_line(result: dict[str, Any], elapsed: float, remaining: float, images_per_env: int,
                  validated: bool) -> str:
    """One compact line per iteration; returns are per image (an env episode carries several images);
    ``remaining``: seconds until --iterations or --time-budget ends the run, whichever comes first."""
    runners = result.get("env_runners", {})
    returns = runners.get("module_episode_returns_mean", {})
    ret = " ".join(f"R/img[{m[:3]}]={v / images_per_env:+.3f}" for m, v in sorted(returns.items()))
    parts = [f"iter {result['training_iteration']:4d}",
             f"steps {result.get('num_env_steps_sampled_lifetime', 0):>8}", ret,
             f"agree {100 * runners.get('agree', float('nan')):5.1f}%",
             f"acc {100 * runners.get('correct', float('nan')):5.1f}%",
             f"kept {runners.get('keep_ratio', float('nan')):.3f}",
             f"GFLOPs {runners.get('gflops', float('nan')):.4f}",
             f"{duration(elapsed):>6} elapsed, {duration(remaining):>6} left"]
    if validated:  # results carry the last validation along; show it only where it ran
        val = result.get("evaluation", {})
        parts.append(f"| val exact {val.get('exact_accuracy', float('nan')):.2f}% "
                     f"adaptive {val.get('adaptive_accuracy', float('nan')):.2f}% "
                     f"(kept {val.get('adaptive_keep_ratio', float('nan')):.3f})")
    return "  ".join(parts)


def validation_score(result: dict[str, Any]) -> float | None:
    """The score checkpoints are selected by: top-1 accuracy of the exact-budget mode (``MARL exact``, what
    ships at the problem's budget) on the validation images."""
    return result.get("evaluation", {}).get("exact_accuracy")


class MetricsWriter:
    """Every flattened RLlib result row to CSV (columns fixed by the first row) and TensorBoard.

    On resume, rows logged after the restored iteration (work lost since that checkpoint) are dropped.
    """

    def __init__(self, output_dir: Path, iteration: int = 0):
        from tensorboardX import SummaryWriter

        self.path = output_dir / "progress.csv"
        self.tb = SummaryWriter(str(output_dir / "tb"))
        self.columns: list[str] | None = None
        if self.path.exists():
            with self.path.open() as f:
                rows = list(csv.reader(f))
            self.columns = rows[0] if rows else None
            if self.columns and "training_iteration" in self.columns:
                at = self.columns.index("training_iteration")
                kept = [r for r in rows[1:] if r[at] and float(r[at]) <= iteration]
                with self.path.open("w", newline="") as f:
                    csv.writer(f).writerows([self.columns, *kept])

    def write(self, result: dict[str, Any]) -> None:
        flat = {k: v for k, v in flatten_dict(result, delimiter="/").items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = result["training_iteration"]
        for key, value in flat.items():
            if math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.columns is None:
            self.columns = sorted(flat)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([flat.get(c, "") for c in self.columns])


def train(args: argparse.Namespace) -> Path:
    """Run (or continue) training; uses the Ray instance already initialised in this process, if any."""
    checkpoint, problem = resolve_start(args)
    settings = server_settings(problem, args.server_threads, data_access(args))
    inputs = {name: load_server_inputs(s) for name, s in settings.items()}  # bad backbone/data fail here
    if not ray.is_initialized():
        start_ray(args)
    placement = plan_placement(args.servers, args.server_threads, ray.cluster_resources().get("GPU", 0),
                               torch.cuda.is_available())
    print(placement.describe(args.num_workers), flush=True)
    initial_states = {}
    if checkpoint is None and problem.warm_start != "none":
        initial_states = imitate_heuristic(problem, inputs[TRAIN_SERVER],
                                           Path(args.output_dir).resolve() / "warm_start")
    servers = [*start_vit_servers(replace(settings[TRAIN_SERVER], num_gpus=placement.server_gpus,
                                          num_cpus=placement.server_cpus),
                                  train_server_names(placement.servers), inputs[TRAIN_SERVER]),
               start_vit_server(replace(settings[VAL_SERVER], num_gpus=placement.server_gpus), VAL_SERVER,
                                inputs[VAL_SERVER])]
    try:
        return run_training(args, checkpoint, problem, servers[0], placement, initial_states)
    finally:
        for server in servers:
            ray.kill(server, no_restart=True)


def imitate_heuristic(problem: PruningProblem, inputs: ServerInputs, directory: Path) -> dict[str, Path]:
    """The warm start (policies/warm_start.py): the similarity module fitted to a heuristic on a seeded
    subset of the train split, saved under ``directory``; returns ``{"similarity": its path}``."""
    started = time.time()
    staged = staged_from_weights(inputs.state, inputs.config, problem.prune_points)
    chosen = torch.randperm(len(inputs.images), generator=torch.Generator().manual_seed(problem.seed))
    images = normalize(inputs.images[chosen[:IMITATION_IMAGES]], inputs.config)
    model_config = {"hidden": problem.hidden, "init_logit_bias": initial_logit_bias(
        "similarity", problem.agents, problem.target_ratio, problem.warm_start)}
    path, agreement = warm_start_similarity(staged, images, problem.target_ratio, problem.reduction,
                                            problem.warm_start, model_config, directory, problem.seed)
    print(f"warm start: similarity agent imitates {problem.warm_start} on {len(images)} train images "
          f"({agreement:.1%} of token decisions match) in {time.time() - started:.0f} s", flush=True)
    return {"similarity": path}


def run_training(args: argparse.Namespace, checkpoint: Path | None, problem: PruningProblem, train_server,
                 placement: Placement, initial_states: dict[str, Path] | None = None) -> Path:
    """The PPO loop: train, log, checkpoint every K iterations, record the best on validation."""
    out = Path(args.output_dir).resolve()
    spec = ray.get(train_server.spec.remote())
    config = build_config(problem, spec, args.num_workers, args.envs_per_worker, placement, initial_states)
    if checkpoint is not None:  # a checkpoint of another backbone or feature set fails here, clearly
        check_policies(load_policies(checkpoint)[0], spec.num_patches, checkpoint)
    algo = config.build_algo()
    if checkpoint is not None:
        try:
            algo.restore_from_path(str(checkpoint.resolve()))
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint can fail in many ways
            algo.stop()
            raise PolicyCheckpointError(f"cannot restore {checkpoint}: {type(error).__name__}: {error}") from None
        # restore pushes weights to remote runners without waiting; make sure they have them
        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group,
                                           inference_only=True, timeout_seconds=60)
        print(f"resumed from {checkpoint} at iteration {algo.iteration}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out, algo.iteration)
    best_path = out / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() and checkpoint is not None else None
    began, first, last = time.time(), algo.iteration, None
    while algo.iteration < args.iterations:
        result = algo.train()
        writer.write(result)
        validated = algo.iteration % problem.checkpoint_every == 0  # evaluation_interval == checkpoint_every
        elapsed = time.time() - began
        remaining = (args.iterations - algo.iteration) * elapsed / (algo.iteration - first)
        if args.time_budget > 0:
            remaining = max(0.0, min(remaining, 60 * args.time_budget - elapsed))
        print(progress_line(result, elapsed, remaining, problem.images_per_env, validated), flush=True)
        out_of_time = args.time_budget > 0 and elapsed > 60 * args.time_budget
        final = algo.iteration >= args.iterations or out_of_time
        if validated or final:
            score = validation_score(result) if validated else None
            last = write_checkpoint(algo, out, CheckpointInfo(problem, algo.iteration, score))
            if score is not None and (best is None or score > best["val_score"]):
                best = {"checkpoint": str(last.relative_to(out)), "iteration": algo.iteration,
                        "val_score": score, "versions": versions_line()}
                best_path.write_text(json.dumps(best, indent=2) + "\n")
            protect = {out / best["checkpoint"]} if best else set()
            remove_old_checkpoints(out, args.keep_checkpoints, protect)
        if out_of_time:
            print(f"time budget of {args.time_budget} min reached", flush=True)
            break
    if last is None:  # resumed at or past --iterations: write the restored state as it is
        last = write_checkpoint(algo, out, CheckpointInfo(problem, algo.iteration))
    algo.stop()
    return last


def closing_line(output_dir: Path, last: Path) -> str:
    """Which checkpoint to use (the best on validation, else the last) and the command that evaluates it."""
    best_path = output_dir / "best.json"
    if best_path.exists():
        best = json.loads(best_path.read_text())
        chosen, why = output_dir / best["checkpoint"], (f"best on validation: iteration {best['iteration']}, "
                                                        f"exact-budget accuracy {best['val_score']:.2f}%")
    else:
        chosen, why = last, "no validation ran; the last checkpoint"
    return (f"best checkpoint: {chosen} ({why})\n"
            f"evaluate it: python evaluate.py --checkpoint {chosen} "
            f"--data-dir {read_checkpoint_info(chosen).problem.data_dir}")


def main(argv: list[str] | None = None) -> int:
    owns_ray = not ray.is_initialized()
    try:
        args = build_parser().parse_args(argv)
        last = train(args)
    except (ValueError, DataError, CheckpointError, PolicyCheckpointError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    print(f"last checkpoint: {last}")
    print(closing_line(Path(args.output_dir), last))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
