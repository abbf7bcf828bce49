"""How fast the ViT server serves pruning episodes, next to the backbone it wraps, measured in one run.

Training speed is bounded by how many images per second go through the server, so this puts four numbers
side by side, all on the same machine, data and thread count:

1. the backbone alone: batched, unpruned forwards (timm and ``StagedViT``), the compute reference;
2. the ``PruningEngine`` in this process, no Ray: what the episode logic (stage splits, padding,
   features, numpy observations) costs on top of the forwards;
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
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from envs.problem import PruningProblem
from envs.pruning_engine import PruningEngine
from envs.vit.backbone_checkpoint import REFERENCE_BACKBONE, load_backbone, normalize
from envs.vit.data import load_split
from envs.vit.flops import ViTSpec, backbone_gflops, heuristic_schedule, schedule_tokens
from envs.vit.staged_vit import StagedViT
from envs.vit.timing import timed_calls
from envs.vit.token_ops import tokens_to_keep
from envs.vit_server import NAMESPACE, ServerSettings, start_vit_servers

Call = Callable[..., Any]  # call(method_name, *args) -> result, on an engine or a server


# -- measurements shared by the in-process engine and the Ray callers ------------------------------------


def keep_first(live: np.ndarray, ratio: float) -> np.ndarray:
    """Keep exactly ``tokens_to_keep`` tokens, the first live rows: a fixed, cheap, exact-budget policy."""
    keep = np.zeros(len(live), dtype=bool)
    keep[:tokens_to_keep(int(live.sum()), ratio)] = True
    return keep


def run_episode(call: Call, keys: list[str], indices: list[int], ratio: float) -> list[float]:
    """One full episode (reset, then a step per pruning point) for a batch of images; per-call seconds."""
    latencies = []
    start = time.perf_counter()
    observations = call("reset", keys, indices)
    latencies.append(time.perf_counter() - start)
    while True:
        keep = [keep_first(obs["live"], ratio) for obs in observations]
        start = time.perf_counter()
        results = call("step", keys, keep)
        latencies.append(time.perf_counter() - start)
        if results[0]["done"]:
            return latencies
        observations = [result["obs"] for result in results]


def loop_episodes(call: Call, seconds: float, images_per_call: int, num_images: int, ratio: float,
                  tag: str, seed: int) -> dict[str, Any]:
    """Loop full episodes on random images until ``seconds`` have passed (the last one finishes)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    end = start + seconds
    latencies: list[float] = []
    episodes = 0
    while episodes == 0 or time.perf_counter() < end:  # at least one episode
        keys = [f"{tag}-{episodes}-{i}" for i in range(images_per_call)]
        latencies += run_episode(call, keys, rng.integers(0, num_images, images_per_call).tolist(), ratio)
        episodes += 1
    return {"images": episodes * images_per_call, "episodes": episodes, "calls": len(latencies),
            "latencies": latencies, "elapsed": time.perf_counter() - start}


def warm_cache(call: Call, num_images: int, chunk: int = 64) -> None:
    """Start (and drop) one episode per image, so the engine's cached unpruned forward is not timed."""
    for start in range(0, num_images, chunk):
        indices = list(range(start, min(num_images, start + chunk)))
        keys = [f"warm-{i}" for i in indices]
        call("reset", keys, indices)
        call("release", keys)


@ray.remote(num_cpus=0)
class Caller:
    """One concurrent client of the server, looping full episodes like an env runner (without a policy)."""

    def __init__(self, server: ray.actor.ActorHandle, num_images: int, ratio: float, seed: int):
        self.server, self.num_images, self.ratio, self.seed = server, num_images, ratio, seed
        self.runs = 0

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.server, method).remote(*args))

    def run(self, start_at: float, seconds: float, images_per_call: int) -> dict[str, Any]:
        """Wait for the common start (wall clock, shared by all callers on this node), then loop."""
        time.sleep(max(0.0, start_at - time.time()))
        self.runs += 1
        out = loop_episodes(self._call, seconds, images_per_call, self.num_images, self.ratio,
                            f"caller{self.seed}-{self.runs}", self.seed + 1000 * self.runs)
        out["finished_at"] = time.time()
        return out


# -- the four measurements ---------------------------------------------------------------------------


def bench_backbone(model: torch.nn.Module, staged: StagedViT, inputs: torch.Tensor,
                   seconds: float) -> list[dict[str, Any]]:
    """Unpruned batched forwards, eval mode, no grad: the compute the server's episodes are compared to."""
    rows = []
    with torch.no_grad():
        for name, module in (("backbone: timm forward", model), ("backbone: StagedViT forward", staged)):
            times = timed_calls(lambda m=module: m(inputs), repeats=5, seconds=seconds, warmup=3)
            median = statistics.median(times)
            rows.append({"what": f"{name}, batch {len(inputs)}", "kind": "backbone",
                         "images_per_s": len(inputs) / median, "calls": len(times),
                         "mean_call_ms": 1000 * statistics.mean(times), "median_call_ms": 1000 * median})
    return rows


def episode_row(what: str, kind: str, runs: list[dict[str, Any]], elapsed: float,
                stats: dict[str, int] | None = None) -> dict[str, Any]:
    """Throughput and latency of one or more concurrent episode loops, plus server counters if any."""
    latencies = [lat for run in runs for lat in run["latencies"]]
    images = sum(run["images"] for run in runs)
    row: dict[str, Any] = {"what": what, "kind": kind, "images_per_s": images / elapsed,
                           "episodes": sum(run["episodes"] for run in runs), "calls": len(latencies),
                           "elapsed_s": elapsed, "mean_call_ms": 1000 * statistics.mean(latencies),
                           "p90_call_ms": 1000 * float(np.percentile(latencies, 90))}
    if stats is not None:
        row.update({k: stats[k] for k in ("requests", "batches", "forwards", "images")})
        row["forwards_per_request"] = stats["forwards"] / max(1, stats["requests"])
        row["images_per_forward"] = stats["images"] / max(1, stats["forwards"])
    return row


def bench_engine(engine: PruningEngine, sizes: list[int], seconds: float, ratio: float) -> list[dict[str, Any]]:
    """The engine called directly: episode logic without Ray, one caller, so no cross-caller batching."""
    def call(method: str, *args: Any) -> Any:
        return getattr(engine, method)(*args)

    warm_cache(call, len(engine.labels))
    rows = []
    for size in sizes:
        forwards = engine.forwards
        run = loop_episodes(call, seconds, size, len(engine.labels), ratio, f"engine{size}", seed=size)
        row = episode_row(f"engine in-process, {size} images/call", "engine", [run], run["elapsed"])
        row["forwards_per_request"] = (engine.forwards - forwards) / row["calls"]
        rows.append(row)
    return rows


def server_stats_delta(server: ray.actor.ActorHandle, before: dict[str, int]) -> dict[str, int]:
    after = ray.get(server.stats.remote())
    return {k: after[k] - before[k] for k in ("requests", "batches", "forwards", "images")}


def bench_server(server: ray.actor.ActorHandle, num_images: int, callers: list[int], images_per_call: int,
                 seconds: float, ratio: float) -> list[dict[str, Any]]:
    """N caller actors loop episodes at once from a common start; throughput counts all their images."""
    warm_cache(lambda method, *args: ray.get(getattr(server, method).remote(*args)), num_images)
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


def step_env(env, rng: np.random.Generator, seconds: float) -> dict[str, Any]:
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


def make_env(server_names: str | list[str], problem: PruningProblem, index: int = 0):
    """A TokenPruningEnv as env runner ``index`` would have it (it picks server ``index % len(names)``)."""
    from ray.rllib.env.env_context import EnvContext  # imports RLlib: only when needed

    from envs.pruning_env import TokenPruningEnv

    return TokenPruningEnv(EnvContext({"server_name": server_names, "seed": index, "problem": problem.to_json()},
                                      worker_index=index))


def bench_env(server: ray.actor.ActorHandle, server_name: str, problem: PruningProblem, sizes: list[int],
              seconds: float, seed: int = 0) -> list[dict[str, Any]]:
    """One TokenPruningEnv in this process (what one env runner steps), random MultiBinary actions."""
    rows = []
    for size in sizes:
        env = make_env(server_name, replace(problem, images_per_env=size))
        rng = np.random.default_rng(seed)
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


def machine_info(torch_threads: int) -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy the machine was."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch_threads, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rates(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{row['images_per_s']:.1f}" for row in rows)


def markdown_table(rows: list[dict[str, Any]], backbone_ips: float, ceiling_ips: float) -> str:
    """One row per measurement; server counters show the batching (fewer forwards per request is better)."""
    header = ["measurement", "images/s", "÷ backbone", "÷ pruned ceiling", "env steps/s", "mean call ms",
              "p90 call ms", "requests", "batches", "forwards", "forwards/request", "images/forward"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ips = row["images_per_s"]
        cells = [row["what"], _fmt(ips), _fmt(ips / backbone_ips, 2), _fmt(ips / ceiling_ips, 2),
                 _fmt(row.get("env_steps_per_s")), _fmt(row.get("mean_call_ms"), 2), _fmt(row.get("p90_call_ms"), 2),
                 _fmt(row.get("requests")), _fmt(row.get("batches")), _fmt(row.get("forwards")),
                 _fmt(row.get("forwards_per_request"), 2), _fmt(row.get("images_per_forward"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default=str(REFERENCE_BACKBONE) if REFERENCE_BACKBONE.exists() else None,
                        required=not REFERENCE_BACKBONE.exists(), help="backbone checkpoint directory")
    parser.add_argument("--data-dir", default="../shared/data", help="holds cifar10/{train,test}.tar")
    parser.add_argument("--dataset", default=defaults.problem.dataset)
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=512, help="images served (each one warmed once)")
    parser.add_argument("--batch", type=int, default=64, help="backbone batch size")
    parser.add_argument("--images-per-call", type=int, default=8, help="images per server request")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 2, 4], help="concurrent callers")
    parser.add_argument("--env-images", type=int, nargs="+", default=[1, 8], help="images_per_env values")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--torch-threads", type=int, default=defaults.torch_threads)
    parser.add_argument("--target-ratio", type=float, default=defaults.problem.target_ratio)
    parser.add_argument("--prune-points", type=int, nargs="+", default=list(defaults.problem.prune_points))
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long the server waits for company before a drain")
    parser.add_argument("--servers", type=int, default=2, help="servers of the last measurement (1 vs this many)")
    parser.add_argument("--runners", type=int, default=4, help="env runner stand-ins of the last measurement")
    parser.add_argument("--ray-cpus", type=int, default=4, help="num_cpus of the local Ray instance")
    parser.add_argument("--output", help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)  # the server's setting, so the comparison is like for like
    machine_start = machine_info(args.torch_threads)
    model, config = load_backbone(args.backbone)
    prune_points = tuple(args.prune_points)
    staged = StagedViT(model, prune_points).eval()
    split = load_split(args.dataset, args.split, args.data_dir, input_size=config["input_size"], limit=args.limit)
    print(f"backbone {args.backbone} ({config['model_name']}, {staged.num_patches} patches, "
          f"{staged.depth} blocks), {len(split)} {args.split} images, torch threads {args.torch_threads}",
          flush=True)

    spec = ViTSpec.from_model(model)
    full = backbone_gflops(spec, schedule_tokens(spec, prune_points, [staged.num_patches] * staged.num_stages))
    schedule = heuristic_schedule(staged.num_patches, len(prune_points), args.target_ratio)
    pruned = backbone_gflops(spec, schedule_tokens(spec, prune_points, schedule))

    batch = split.images[torch.arange(args.batch) % len(split)]
    rows = bench_backbone(model, staged, normalize(batch, config), args.seconds)
    backbone_ips = rows[0]["images_per_s"]
    ceiling_ips = backbone_ips * full / pruned
    print(f"backbone {backbone_ips:.1f} images/s; pruned schedule {schedule} costs {pruned / full:.2f}x "
          f"the GFLOPs ({pruned:.4f} vs {full:.4f}), so the compute ceiling is {ceiling_ips:.1f} images/s",
          flush=True)

    problem = PruningProblem(backbone=args.backbone, dataset=args.dataset, data_dir=args.data_dir,
                             prune_points=prune_points, target_ratio=args.target_ratio,
                             rollouts_per_image=1, reward_baseline="distinct")  # distinct images, as measured
    engine = PruningEngine(StagedViT(model, prune_points), config, split.images, split.labels,
                           problem.target_ratio, problem.reduction)
    engine_sizes = sorted({args.images_per_call, args.batch})
    rows += bench_engine(engine, engine_sizes, args.seconds, args.target_ratio)
    print(f"engine done: {_rates(rows[2:])} images/s", flush=True)
    del engine

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             namespace=NAMESPACE, object_store_memory=256 * 1024**2)
    try:
        name = f"bench_vit_server_{os.getpid()}"
        settings = ServerSettings(problem, split=args.split, limit=args.limit, max_batch=args.max_batch,
                                  max_wait_ms=args.max_wait_ms, torch_threads=args.torch_threads, num_cpus=0)
        names = [f"{name}_{index}" for index in range(args.servers)]
        servers = start_vit_servers(settings, names)
        server = servers[0]
        rows += bench_server(server, len(split), args.callers, args.images_per_call, args.seconds,
                             args.target_ratio)
        print(f"server done: {_rates(rows[-len(args.callers):])} images/s", flush=True)
        rows += bench_env(server, names[0], problem, args.env_images, args.seconds)
        for other in servers[1:]:
            warm_cache(lambda method, *a, other=other: ray.get(getattr(other, method).remote(*a)), len(split))
        rows += bench_servers(servers, names, replace(problem, images_per_env=args.images_per_call),
                              args.runners, args.seconds)
    finally:
        ray.shutdown()

    machine = {**machine_info(args.torch_threads), "load_avg_at_start": machine_start["load_avg_1_5_15"]}
    table = markdown_table(rows, backbone_ips, ceiling_ips)
    print()
    print(f"All engine/server/env rows ran after one warm-up pass over the {len(split)} images (the engine's "
          "cached unpruned forward per image is not timed).")
    print(f"Episodes keep tokens_to_keep(n, {args.target_ratio}) tokens per pruning point: {schedule}; "
          f"'÷ pruned ceiling' divides by backbone images/s x {full / pruned:.2f} (the GFLOPs ratio).")
    print("Env rows step random sets of any size: about half of the live tokens survive each pruning point (those "
          "the similarity agent's random set does not remove), close to the server rows' budget.")
    print()
    print(table)
    print()
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), torch threads "
          f"{machine['torch_threads']}, torch {machine['torch']}, ray {machine['ray']}, load average "
          f"{machine['load_avg_at_start']} at start, {machine['load_avg_1_5_15']} at end")
    print("Command: " + " ".join(sys.orig_argv))
    result = {"args": vars(args), "machine": machine, "gflops_unpruned": full, "gflops_pruned": pruned,
              "schedule": schedule, "backbone_images_per_s": backbone_ips, "ceiling_images_per_s": ceiling_ips,
              "rows": rows, "table": table}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
