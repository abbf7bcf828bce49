"""How fast the ViT server serves pruning episodes, next to the backbone it wraps, measured in one run.

Training speed is bounded by how many images per second go through the server, so this puts five kinds of rows
side by side, all on the same machine, data and thread count:

1. the backbone alone: batched, unpruned forwards (timm and ``StagedViT``), the compute reference;
2. the ``PruningEngine`` in this process, no Ray: what the episode logic (stage splits, padding,
   features, numpy observations) costs on top of the forwards (rows 1 and 2 are
   ``benchmarks/engine_throughput.py``'s, on the CPU in float32, as the server runs here);
3. the ViT server actor with 1, 2, 4 concurrent callers (Ray actors looping full episodes): what Ray's
   per-call overhead costs and how much the server's batching wins back;
4. one ``TokenPruningEnv`` against the server with random actions: what one env runner can step;
5. ``--runners`` envs (Ray actors, as env runners) spread over 1 and over ``--servers`` servers, side by
   side: what more servers buy (``train.py --servers``).

A pruned episode at ratio 0.5 needs about half the compute of an unpruned forward (64 -> 32 -> 16 -> 8
tokens), so the "ceiling" column scales the backbone rate by the GFLOPs ratio. The engine computes the
unpruned forward once per image (its label-free target) and caches it; every engine and server measurement
here runs after one warm-up pass over all images, so that cost is left out. Use a small ``--limit``.

Run from the repository root (Ray writes under ``$HOME``)::

    HOME=$(mktemp -d) python -m benchmarks.server_throughput --backbone reference/vit_tiny_cifar10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from benchmarks import benchmark_parser, run_from_command_line, write_json
from benchmarks.engine_throughput import (
    Column,
    PrunedCost,
    add_common_arguments,
    describe_machine,
    episode_row,
    loop_episodes,
    machine_info,
    markdown_table,
    measure,
    warm_cache,
)
from cli import non_negative_float, positive_int
from envs.problem import PruningProblem
from envs.server_settings import ServerSettings
from envs.vit.backbone_checkpoint import load_backbone
from envs.vit.data import load_split
from envs.vit_server import NAMESPACE, start_vit_servers
from training.ray_session import interrupt_on_sigterm

if TYPE_CHECKING:
    from envs.pruning_env import TokenPruningEnv  # imports RLlib: at run time only where an env is made

CPU = torch.device("cpu")  # the servers measured here run on the CPU


# -- the Ray rows ----------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class Caller:
    """One concurrent client of the server, looping full episodes like an env runner (without a policy)."""

    def __init__(self, server: ray.actor.ActorHandle, num_images: int, ratio: float, seed: int):
        self.server, self.num_images, self.ratio, self.seed = server, num_images, ratio, seed
        self.runs = 0

    def run(self, start_at: float, seconds: float, images_per_call: int) -> dict[str, Any]:
        """Wait for the common start (wall clock, shared by all callers on this node), then loop."""
        time.sleep(max(0.0, start_at - time.time()))
        self.runs += 1
        out = loop_episodes(blocking_calls(self.server), seconds, images_per_call, self.num_images, self.ratio,
                            f"caller{self.seed}-{self.runs}", self.seed + 1000 * self.runs)
        out["finished_at"] = time.time()
        return out


def blocking_calls(server: ray.actor.ActorHandle) -> Callable[..., Any]:
    """``call(method, *args)``: the server's ``method`` called and waited for, as the engine in process is called
    (``loop_episodes``, ``warm_cache``)."""
    return lambda method, *args: ray.get(getattr(server, method).remote(*args))


def server_stats_delta(server: ray.actor.ActorHandle, before: dict[str, int]) -> dict[str, int]:
    after = ray.get(server.stats.remote())
    return {k: after[k] - before[k] for k in ("requests", "batches", "forwards", "images")}


def bench_server(server: ray.actor.ActorHandle, num_images: int, callers: list[int], images_per_call: int,
                 seconds: float, ratio: float) -> list[dict[str, Any]]:
    """N caller actors loop episodes at once from a common start; throughput counts all their images."""
    warm_cache(blocking_calls(server), num_images)
    pool = [Caller.remote(server, num_images, ratio, seed) for seed in range(max(callers))]
    ray.get([c.run.remote(0.0, 0.0, images_per_call) for c in pool])  # start the workers, one episode each
    rows = []
    for n in callers:
        before = ray.get(server.stats.remote())
        start_at = time.time() + 0.5
        runs = ray.get([c.run.remote(start_at, seconds, images_per_call) for c in pool[:n]])
        elapsed = max(run["finished_at"] for run in runs) - start_at
        rows.append(episode_row(f"server, {n} caller{'s' if n > 1 else ''} x {images_per_call} images/call",
                                "server", runs, elapsed, server_stats_delta(server, before)))
    for caller in pool:
        ray.kill(caller)
    return rows


def step_env(env: TokenPruningEnv, rng: np.random.Generator, seconds: float) -> dict[str, Any]:
    """Step ``env`` with random MultiBinary actions, whole episodes, until ``seconds`` have passed (at least
    one episode); per-call latencies of reset and step."""
    actions = {aid: space.shape for aid, space in env.action_spaces.items()}
    latencies: list[float] = []
    steps = episodes = 0
    start = time.perf_counter()
    while episodes == 0 or time.perf_counter() < start + seconds:
        tick = time.perf_counter()
        env.reset()
        latencies.append(time.perf_counter() - tick)
        done = False
        while not done:
            action = {a: rng.integers(0, 2, s, dtype=np.int8) for a, s in actions.items()}
            tick = time.perf_counter()
            _, _, terminateds, _, _ = env.step(action)
            latencies.append(time.perf_counter() - tick)
            done = terminateds["__all__"]
            steps += 1
        episodes += 1
    return {"images": episodes * env.num_images, "episodes": episodes, "steps": steps, "latencies": latencies,
            "elapsed": time.perf_counter() - start}


def make_env(server_names: str | list[str], problem: PruningProblem, index: int = 0) -> TokenPruningEnv:
    """A TokenPruningEnv as env runner ``index`` would have it (it picks server ``index % len(names)``)."""
    from ray.rllib.env.env_context import EnvContext  # imports RLlib: only when needed

    from envs.pruning_env import TokenPruningEnv

    return TokenPruningEnv(EnvContext({"server_name": server_names, "seed": index, "problem": problem.to_json()},
                                      worker_index=index))


def bench_env(server: ray.actor.ActorHandle, server_name: str, problem: PruningProblem, sizes: list[int],
              seconds: float) -> list[dict[str, Any]]:
    """One TokenPruningEnv in this process (what one env runner steps), random MultiBinary actions."""
    rows = []
    for size in sizes:
        env = make_env(server_name, replace(problem, images_per_env=size))
        rng = np.random.default_rng(0)  # the same random actions at every size
        step_env(env, rng, 0.0)  # warm-up episode
        before = ray.get(server.stats.remote())
        run = step_env(env, rng, seconds)
        row = episode_row(f"one env, images_per_env {size}, random actions", "env", [run], run["elapsed"],
                          server_stats_delta(server, before))
        row["env_steps_per_s"] = run["steps"] / run["elapsed"]
        rows.append(row)
    return rows


@ray.remote(num_cpus=0)
class EnvRunnerStandIn:
    """An env runner without a policy: one env with runner index ``index``, random actions."""

    def __init__(self, server_names: list[str], problem: PruningProblem, index: int):
        self.env = make_env(server_names, problem, index)
        self.rng = np.random.default_rng(index)
        step_env(self.env, self.rng, 0.0)  # warm-up episode

    def run(self, start_at: float, seconds: float) -> dict[str, Any]:
        """Wait for the common start (wall clock), then step for ``seconds``."""
        time.sleep(max(0.0, start_at - time.time()))
        out = step_env(self.env, self.rng, seconds)
        out["finished_at"] = time.time()
        return out


def bench_servers(servers: list[ray.actor.ActorHandle], names: list[str], problem: PruningProblem, runners: int,
                  seconds: float) -> list[dict[str, Any]]:
    """``runners`` env runner stand-ins spread over the first 1, then all, of the servers (``--servers``):
    what adding a server buys, side by side in one run."""
    rows = []
    for count in sorted({1, len(servers)}):
        pool = [EnvRunnerStandIn.remote(names[:count], problem, index) for index in range(1, runners + 1)]
        before = [ray.get(server.stats.remote()) for server in servers[:count]]
        start_at = time.time() + 1.0
        runs = ray.get([runner.run.remote(start_at, seconds) for runner in pool])
        elapsed = max(run["finished_at"] for run in runs) - start_at
        deltas = [server_stats_delta(server, b) for server, b in zip(servers[:count], before, strict=True)]
        stats = {key: sum(delta[key] for delta in deltas) for key in deltas[0]}
        row = episode_row(f"{runners} envs x {problem.images_per_env} images over {count} server(s)", "servers",
                          runs, elapsed, stats)
        row["env_steps_per_s"] = sum(run["steps"] for run in runs) / elapsed
        rows.append(row)
        for runner in pool:
            ray.kill(runner)
    return rows


# -- report ---------------------------------------------------------------------------------------------

SERVER_COLUMNS: list[Column] = [
    ("measurement", "what", 0), ("images/s", "images_per_s", 1), ("÷ backbone", "of_backbone", 2),
    ("÷ pruned ceiling", "of_ceiling", 2), ("env steps/s", "env_steps_per_s", 1), ("mean call ms", "mean_call_ms", 2),
    ("p90 call ms", "p90_call_ms", 2), ("requests", "requests", 0), ("batches", "batches", 0),
    ("forwards", "forwards", 0), ("forwards/request", "forwards_per_request", 2),
    ("images/forward", "images_per_forward", 1)]
"""The engine table's columns without precision and calls, and the server's counters (fewer forwards per request
is better)."""


def _rates(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{row['images_per_s']:.1f}" for row in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerSettings()
    parser = benchmark_parser(__doc__)
    add_common_arguments(parser)
    parser.add_argument("--images-per-call", type=positive_int, default=8,
                        help="images per server request of the callers, and per env of the --runners stand-ins")
    parser.add_argument("--callers", type=positive_int, nargs="+", default=[1, 2, 4], help="concurrent callers")
    parser.add_argument("--env-images", type=positive_int, nargs="+", default=[1, 8],
                        help="train.py --images-per-env values of the single env in this process")
    parser.add_argument("--max-batch", type=positive_int, default=defaults.max_batch,
                        help="most images a server's engine runs in one batch (ServerSettings.max_batch)")
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=defaults.max_wait_ms,
                        help="how long the server waits for more requests before it runs a batch (default: 2 on a "
                             "GPU, 0 on a CPU)")
    parser.add_argument("--servers", type=positive_int, default=2,
                        help="servers of the last measurement (1 vs this many)")
    parser.add_argument("--runners", type=positive_int, default=4, help="env runner stand-ins of the last measurement")
    parser.add_argument("--ray-cpus", type=positive_int, default=4, help="num_cpus of the local Ray instance")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)  # the server's setting, so the comparison is like for like
    load_at_start = machine_info(args.torch_threads, CPU)["load_avg_1_5_15"]
    model, config = load_backbone(args.backbone)
    prune_points = tuple(args.prune_points)
    split = load_split(args.dataset, args.split, args.data_dir, input_size=config["input_size"], limit=args.limit)
    print(f"backbone {args.backbone} ({config['model_name']}), {len(split)} {args.split} images, torch threads "
          f"{args.torch_threads}", flush=True)

    cost = PrunedCost.of(model, prune_points, args.target_ratio)
    rows = measure(model, config, split.images, split.labels, args, CPU, ["fp32"],
                   sorted({args.images_per_call, args.batch}), cost)
    backbone_ips = rows[0]["images_per_s"]
    ceiling_ips = cost.ceiling(backbone_ips)
    print(f"pruned schedule {cost.schedule} costs {cost.gflops_pruned / cost.gflops_unpruned:.2f}x the GFLOPs "
          f"({cost.gflops_pruned:.4f} vs {cost.gflops_unpruned:.4f}), so the compute ceiling is "
          f"{ceiling_ips:.1f} images/s", flush=True)

    problem = PruningProblem(backbone=args.backbone, dataset=args.dataset, data_dir=args.data_dir,
                             prune_points=prune_points, target_ratio=args.target_ratio, reduction=args.reduction,
                             rollouts_per_image=1, reward_baseline="distinct")  # distinct images, as measured
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             namespace=NAMESPACE, object_store_memory=256 * 1024**2)
    interrupt_on_sigterm()  # ray.init's handler would end the benchmark with exit code 1 and no line
    try:
        name = f"bench_vit_server_{os.getpid()}"
        settings = ServerSettings(problem, split=args.split, limit=args.limit, max_batch=args.max_batch,
                                  max_wait_ms=args.max_wait_ms, torch_threads=args.torch_threads, num_cpus=0)
        names = [f"{name}_{index}" for index in range(args.servers)]
        servers = start_vit_servers(settings, names)
        server = servers[0]
        ray_rows = bench_server(server, len(split), args.callers, args.images_per_call, args.seconds,
                                args.target_ratio)
        print(f"server done: {_rates(ray_rows)} images/s", flush=True)
        ray_rows += bench_env(server, names[0], problem, args.env_images, args.seconds)
        for other in servers[1:]:
            warm_cache(blocking_calls(other), len(split))
        ray_rows += bench_servers(servers, names, replace(problem, images_per_env=args.images_per_call),
                                  args.runners, args.seconds)
    finally:
        ray.shutdown()
    cost.compare(ray_rows, backbone_ips)
    rows += ray_rows

    machine = {**machine_info(args.torch_threads, CPU), "ray": ray.__version__}
    table = markdown_table(rows, SERVER_COLUMNS)
    print()
    print(f"All engine/server/env rows ran after one warm-up pass over the {len(split)} images (the engine's "
          "cached unpruned forward per image is not timed).")
    print(f"Episodes keep tokens_to_keep(n, {args.target_ratio}) tokens per pruning point: {cost.schedule}; "
          f"'÷ pruned ceiling' divides by backbone images/s x {cost.gflops_unpruned / cost.gflops_pruned:.2f} "
          "(the GFLOPs ratio).")
    print("Env rows step random sets of any size: about half of the live tokens survive each pruning point (those "
          "the similarity agent's random set does not remove), close to the server rows' budget.")
    print()
    print(table)
    print()
    print(f"{describe_machine(machine, load_at_start)}, ray {machine['ray']}")
    print("Command: " + " ".join(sys.orig_argv))
    result = {"args": vars(args), "machine": machine, **cost._asdict(), "backbone_images_per_s": backbone_ips,
              "ceiling_images_per_s": ceiling_ips, "rows": rows, "table": table}
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    run_from_command_line(main)
