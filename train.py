"""Train the attention and similarity agents with RLlib PPO (new API stack).

    python train.py --data-dir ../shared/data                    # default run: 18 min of training
    python train.py --num-workers 4 --time-budget 0 --iterations 2000   # longer, more env runners
    python train.py --address auto --num-workers 16              # on a running Ray cluster
    python train.py --output-dir runs/marl --resume              # continue from the latest checkpoint

Sampling uses the ``train`` split; every ``--checkpoint-every`` iterations the deterministic policy is
scored on a fixed subset of the ``val`` split and the best checkpoint is recorded in ``best.json``. The
test split is never read here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.utils import flatten_dict

from envs.backbone_checkpoint import (
    REFERENCE_BACKBONE,
    CheckpointError,
    normalize,
    stored_backbone_path,
)
from envs.cli import OneLineParser
from envs.data import DataError, default_data_dir
from envs.episode_metrics import PruningMetrics
from envs.pruning_env import AGENT_MODES, DEFAULT_ENV_CONFIG, TokenPruningEnv, policy_for_agent, trained_policies
from envs.token_merge import REDUCTIONS
from envs.token_ops import tokens_to_keep
from envs.vit_server import (
    ServerInputs,
    ServerSettings,
    load_server_inputs,
    staged_from_weights,
    start_vit_server,
)
from policies.checkpoints import (
    PolicyCheckpointError,
    check_policies,
    latest_checkpoint,
    list_checkpoints,
    load_policies,
    read_pruning_config,
    remove_old_checkpoints,
    write_checkpoint,
)
from policies.rl_module import TokenPolicyModule
from policies.warm_start import IMITATION_IMAGES, KEEP_PROBABILITY, WARM_STARTS, warm_start_similarity

REPO = Path(__file__).resolve().parent
TRAIN_SERVER, VAL_SERVER = "vit_server_train", "vit_server_val"

# PPO defaults and why: 3-step episodes with a shared terminal reward (result-to-go), so gamma ~ 1 and a
# short GAE horizon; many correlated per-token decisions per action, so a moderate clip and no entropy
# bonus (the multi-Bernoulli entropy is a sum over ~64 tokens and would swamp the reward); lr 1e-4 so the
# warm-started policy changes gradually (at 1e-3 it collapsed to "remove everything" within 7 iterations).
DEFAULT_PPO: dict[str, Any] = {
    "lr": 1e-4, "gamma": 0.99, "lambda_": 0.95, "clip_param": 0.2, "entropy_coeff": 0.0,
    "num_epochs": 4, "minibatch_size": 128, "train_batch_size_per_learner": 256,
    "vf_loss_coeff": 0.5, "use_kl_loss": False, "grad_clip": 1.0,
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=1, help="env runners (0 = sample in the driver, for debugging)")
    run.add_argument("--envs-per-worker", type=int, default=1)
    run.add_argument("--iterations", type=int, default=1000, help="stop after this many iterations in total")
    run.add_argument("--time-budget", type=float, default=18.0, metavar="MINUTES",
                     help="stop (with a checkpoint) after the iteration that passes this much training time; "
                          "0 = no limit (default 18, so the default run fits in ~20 min)")
    run.add_argument("--output-dir", default="runs/marl")
    run.add_argument("--checkpoint-every", type=int, default=10, metavar="K")
    run.add_argument("--keep-checkpoints", type=int, default=3)
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue the run in --output-dir (or from the given checkpoint directory)")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir holds a run")
    run.add_argument("--address", default=None, help="join a Ray cluster (e.g. 'auto'); default: start a local one")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance")
    run.add_argument("--server-threads", type=int, default=1, help="torch threads of each ViT server")
    run.add_argument("--seed", type=int, default=0)

    problem = p.add_argument_group("pruning problem (taken from the checkpoint on --resume)")
    problem.add_argument("--backbone", default=str(REFERENCE_BACKBONE), help="backbone checkpoint directory")
    problem.add_argument("--dataset", default="cifar10")
    problem.add_argument("--data-dir", default=default_data_dir())
    problem.add_argument("--train-limit", type=int, default=None, help="sample from a seeded subset of train")
    problem.add_argument("--val-limit", type=int, default=1000, help="validation images scored per checkpoint")
    problem.add_argument("--target-ratio", type=float, default=0.5,
                         help="fraction of live patch tokens removed at each pruning point (0.5: 64->32->16->8)")
    problem.add_argument("--prune-points", default="3,6,9", help="blocks before which tokens are pruned")
    problem.add_argument("--reduction", choices=REDUCTIONS, default="merge",
                         help="what happens to removed tokens: merged into the most similar kept one (ToMe) "
                              "or dropped")
    problem.add_argument("--agents", choices=AGENT_MODES, default="both",
                         help="'attention' or 'similarity' trains one agent alone (ablation)")
    problem.add_argument("--images-per-env", type=int, default=DEFAULT_ENV_CONFIG["images_per_env"])
    for key in ("agree_weight", "prob_weight", "budget_weight"):
        problem.add_argument(f"--{key.replace('_', '-')}", type=float, default=DEFAULT_ENV_CONFIG[key])
    problem.add_argument("--hidden", type=int, default=64, help="width of the policy networks")
    problem.add_argument("--warm-start", choices=WARM_STARTS, default="greedy",
                         help="'greedy' (default): the similarity agent first imitates greedy similarity "
                              "removal on train images (policies/warm_start.py), the attention agent starts "
                              f"keeping {round(KEEP_PROBABILITY * 100)}%% of tokens; 'none': both start uniform")
    ppo = p.add_argument_group("PPO")
    for key, value in DEFAULT_PPO.items():
        ppo.add_argument(f"--{key.rstrip('_').replace('_', '-')}", dest=key, type=type(value)
                         if not isinstance(value, bool) else _boolean, default=value)
    return p


def _boolean(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def initial_bias(policy: str, agents: str, target_ratio: float, warm_start: str = "none") -> float:
    """Logit bias so that, at the start, the AND of both agents keeps the target fraction on average
    (with a warm start, the attention agent keeps ``KEEP_PROBABILITY`` and the imitation does the rest)."""
    keep = 1.0 - target_ratio
    p = math.sqrt(keep) if agents == "both" else keep
    if warm_start != "none" and policy == "attention":
        p = KEEP_PROBABILITY
    keep_logit = math.log(p / (1 - p)) if 0 < p < 1 else 0.0
    return keep_logit if policy == "attention" else -keep_logit  # similarity votes "redundant"


def build_config(problem: dict[str, Any], spec, num_workers: int, envs_per_worker: int, seed: int,
                 gpus: float, initial_states: dict[str, Path] | None = None) -> PPOConfig:
    """The whole PPO setup as data: env, the two policies, resources, PPO and validation settings.

    ``initial_states``: module directories (``RLModule.save_to_path``) the policies start from (warm start).
    """
    env_config = {**problem["env"], "server_name": TRAIN_SERVER, "seed": seed}
    val_config = {**env_config, "server_name": VAL_SERVER, "sequential": True}
    agents = problem["env"]["agents"]
    policies = trained_policies(agents)
    warm_start = problem.get("warm_start", "none")
    initial_states = initial_states or {}
    module_specs = {  # spaces come from the env, per policy
        policy: RLModuleSpec(module_class=TokenPolicyModule, model_config={
            **problem["model_config"],
            "init_logit_bias": initial_bias(policy, agents, spec.target_ratio, warm_start)},
            load_state_path=str(initial_states[policy]) if policy in initial_states else None)
        for policy in policies}
    images_per_env = problem["env"]["images_per_env"]
    val_episodes = max(1, math.ceil(problem["val_limit"] / images_per_env))
    return (
        PPOConfig()
        .environment(TokenPruningEnv, env_config=env_config, disable_env_checking=True)
        .multi_agent(policies=set(policies), policy_mapping_fn=policy_for_agent)
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=module_specs))
        .env_runners(num_env_runners=num_workers, num_envs_per_env_runner=envs_per_worker,
                     rollout_fragment_length="auto", num_cpus_per_env_runner=1, sample_timeout_s=600.0)
        .learners(num_learners=0, num_gpus_per_learner=gpus)
        .training(**problem["ppo"])
        .callbacks(PruningMetrics)
        .evaluation(evaluation_interval=problem["checkpoint_every"], evaluation_num_env_runners=0,
                    evaluation_duration=val_episodes, evaluation_duration_unit="episodes",
                    evaluation_config=PPOConfig.overrides(env_config=val_config))
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=1000,
                         delay_between_env_runner_restarts_s=5.0)
        .debugging(seed=seed)
    )


def problem_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """What defines the pruning problem and the learner, stored in every checkpoint."""
    try:
        points = tuple(int(p) for p in args.prune_points.split(","))
    except ValueError:
        raise ValueError(f"--prune-points must be comma-separated integers, got {args.prune_points!r}") from None
    backbone = Path(args.backbone).resolve()
    stored = str(backbone.relative_to(REPO)) if backbone.is_relative_to(REPO) else str(backbone)
    server = ServerSettings(backbone=stored, dataset=args.dataset, data_dir=str(args.data_dir),
                            limit=args.train_limit, prune_points=points, target_ratio=args.target_ratio,
                            reduction=args.reduction)
    env = {"agents": args.agents, "images_per_env": args.images_per_env,
           **{k: getattr(args, k) for k in ("agree_weight", "prob_weight", "budget_weight")}}
    return {"server": asdict(server), "val_limit": args.val_limit, "env": env,
            "model_config": {"hidden": args.hidden}, "warm_start": args.warm_start,
            "ppo": {k: getattr(args, k) for k in DEFAULT_PPO},
            "checkpoint_every": args.checkpoint_every, "seed": args.seed}


def validate(args: argparse.Namespace) -> None:
    """Reject bad settings before anything starts or is written."""
    tokens_to_keep(1, args.target_ratio)  # the one place that defines a valid ratio: (0, 1)
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    for name in ("iterations", "checkpoint_every", "envs_per_worker", "images_per_env", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def resolve_start(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any]]:
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
    return checkpoint, read_pruning_config(checkpoint)


def start_ray(args: argparse.Namespace) -> None:
    """A local Ray instance, or the cluster at --address with this repo shipped to every node."""
    if args.address:
        runtime_env = {"working_dir": str(REPO),
                       "excludes": [".git/", "runs/", "results/", "data/", ".venv/", "*.safetensors"]}
        ray.init(address=args.address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)


def server_settings(problem: dict[str, Any], threads: int) -> dict[str, ServerSettings]:
    """One ViT server on the train split for sampling, one on a val subset for checkpoint selection."""
    server = problem["server"]
    train = ServerSettings(**{**server, "backbone": str(stored_backbone_path(server["backbone"])),
                              "prune_points": tuple(server["prune_points"]), "num_cpus": 0, "torch_threads": threads})
    return {TRAIN_SERVER: train, VAL_SERVER: replace(train, split="val", limit=problem["val_limit"])}


def progress_line(result: dict[str, Any], elapsed: float, images_per_env: int, validated: bool) -> str:
    """One compact line per iteration; returns are per image (an env episode carries several images)."""
    runners = result.get("env_runners", {})
    returns = runners.get("module_episode_returns_mean", {})
    ret = " ".join(f"R/img[{m[:3]}]={v / images_per_env:+.3f}" for m, v in sorted(returns.items()))
    parts = [f"iter {result['training_iteration']:4d}",
             f"steps {result.get('num_env_steps_sampled_lifetime', 0):>8}", ret,
             f"agree {100 * runners.get('agree', float('nan')):5.1f}%",
             f"acc {100 * runners.get('correct', float('nan')):5.1f}%",
             f"kept {runners.get('keep_ratio', float('nan')):.3f}",
             f"GFLOPs {runners.get('gflops', float('nan')):.4f}", f"{elapsed:6.0f}s"]
    evaluation = result.get("evaluation", {}).get("env_runners", {})
    if validated:  # results carry the last validation along; show it only where it ran
        parts.append(f"| val agree {100 * evaluation.get('agree', float('nan')):.1f}% "
                     f"kept {evaluation.get('keep_ratio', float('nan')):.3f}")
    return "  ".join(parts)


def validation_score(result: dict[str, Any], images_per_env: int) -> float | None:
    """Mean return per image on the validation images (fidelity minus budget penalty).

    The policy samples as in training: thresholding each token's probability at 0.5 would score a different
    (and, early on, non-pruning) policy than the one PPO optimises.
    """
    returns = result.get("evaluation", {}).get("env_runners", {}).get("module_episode_returns_mean", {})
    return float(sum(returns.values()) / len(returns) / images_per_env) if returns else None


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
    settings = server_settings(problem, args.server_threads)
    inputs = {name: load_server_inputs(s) for name, s in settings.items()}  # bad backbone/data fail here
    if not ray.is_initialized():
        start_ray(args)
    gpus = 0.5 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    initial_states = {}
    if checkpoint is None and problem.get("warm_start", "none") == "greedy":
        initial_states = imitate_greedy_similarity(problem, settings[TRAIN_SERVER], inputs[TRAIN_SERVER],
                                                   Path(args.output_dir).resolve() / "warm_start")
    servers = [start_vit_server(replace(s, num_gpus=gpus), name, inputs[name]) for name, s in settings.items()]
    try:
        return run_training(args, checkpoint, problem, servers[0], gpus, initial_states)
    finally:
        for server in servers:
            ray.kill(server, no_restart=True)


def imitate_greedy_similarity(problem: dict[str, Any], settings: ServerSettings, inputs: ServerInputs,
                              directory: Path) -> dict[str, Path]:
    """The warm start (policies/warm_start.py): the similarity module fitted to greedy similarity on a seeded
    subset of the train split, saved under ``directory``; returns ``{"similarity": its path}``."""
    started = time.time()
    staged = staged_from_weights(inputs.state, inputs.config, settings.prune_points)
    chosen = torch.randperm(len(inputs.images), generator=torch.Generator().manual_seed(problem["seed"]))
    images = normalize(inputs.images[chosen[:IMITATION_IMAGES]], inputs.config)
    model_config = {**problem["model_config"], "init_logit_bias": initial_bias(
        "similarity", problem["env"]["agents"], settings.target_ratio, "greedy")}
    path, agreement = warm_start_similarity(staged, images, settings.target_ratio, settings.reduction,
                                            model_config, directory, problem["seed"])
    print(f"warm start: similarity agent imitates greedy similarity on {len(images)} train images "
          f"({agreement:.1%} of token decisions match) in {time.time() - started:.0f} s", flush=True)
    return {"similarity": path}


def run_training(args: argparse.Namespace, checkpoint: Path | None, problem: dict[str, Any], train_server,
                 gpus: float, initial_states: dict[str, Path] | None = None) -> Path:
    """The PPO loop: train, log, checkpoint every K iterations, record the best on validation."""
    out = Path(args.output_dir).resolve()
    spec = ray.get(train_server.spec.remote())
    config = build_config(problem, spec, args.num_workers, args.envs_per_worker, problem["seed"], gpus,
                          initial_states)
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
    began, last = time.time(), None
    every = problem["checkpoint_every"]
    while algo.iteration < args.iterations:
        result = algo.train()
        writer.write(result)
        validated = algo.iteration % every == 0  # evaluation_interval == checkpoint_every
        print(progress_line(result, time.time() - began, problem["env"]["images_per_env"], validated), flush=True)
        out_of_time = args.time_budget > 0 and time.time() - began > 60 * args.time_budget
        final = algo.iteration >= args.iterations or out_of_time
        if validated or final:
            score = validation_score(result, problem["env"]["images_per_env"]) if validated else None
            last = write_checkpoint(algo, out, {**problem, "iteration": algo.iteration, "val_score": score})
            if score is not None and (best is None or score > best["val_score"]):
                best = {"checkpoint": str(last.relative_to(out)), "iteration": algo.iteration,
                        "val_score": score}
                best_path.write_text(json.dumps(best, indent=2) + "\n")
            protect = {out / best["checkpoint"]} if best else set()
            remove_old_checkpoints(out, args.keep_checkpoints, protect)
        if out_of_time:
            print(f"time budget of {args.time_budget} min reached", flush=True)
            break
    if last is None:  # resumed at or past --iterations: write the restored state as it is
        last = write_checkpoint(algo, out, {**problem, "iteration": algo.iteration, "val_score": None})
    algo.stop()
    return last


def main(argv: list[str] | None = None) -> int:
    owns_ray = not ray.is_initialized()
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        last = train(args)
    except (ValueError, DataError, CheckpointError, PolicyCheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    print(f"last checkpoint: {last}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
