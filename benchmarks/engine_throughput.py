"""How many pruning episodes per second the engine runs on one device, next to the backbone it prunes; no Ray.

Training goes as fast as the ViT server's ``PruningEngine`` answers, and on a GPU box the engine is what
one GPU server feeds the env runners with. This measures the engine alone, in this process, so it runs
where Ray and gymnasium are missing (neither is imported), and puts two kinds of rows side by side, on the
same device, images and torch thread count:

1. the backbone alone: batched, unpruned forwards (timm and ``StagedViT``), the compute reference;
2. the engine called directly with ``--engine-images`` images per call: one full episode per image (a
   ``reset``, then a ``step`` per pruning point), so images/s is episodes/s. The default sizes are the ones
   the server forms: the images one env request carries (``PruningProblem.images_per_env``) and the most
   that one drain of the server's queue hands the engine (``ServerSettings.max_batch``).

A pruned episode at ratio 0.5 needs about half the compute of an unpruned forward (64 -> 32 -> 16 -> 8
tokens), so the "ceiling" scales the backbone rate by the GFLOPs ratio. The engine computes the unpruned
forward once per image (its label-free target) and caches it; the engine rows run after one warm-up pass
over all images, so that cost is left out, and after one untimed episode at each size (a GPU picks its
kernels per shape). Every timed call ends with a device sync. ``--precision fp32 bf16`` measures both kinds
of rows under bf16 autocast as well. ``benchmarks/server_throughput.py`` adds the Ray server's rows to these.

Run from the repository root::

    python -m benchmarks.engine_throughput --data-dir ../shared/data     # on the GPU when there is one
    python -m benchmarks.engine_throughput --device cuda --random-images --limit 1024 \\
        --engine-images 64 256 1024 --precision fp32 bf16                  # a GPU box without the data set
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from benchmarks import add_data_dir_argument, benchmark_parser, run_from_command_line, write_json
from cli import given_flags, non_negative_float, positive_int
from envs.problem import PruningProblem, block_indices, flag_name, removal_ratio
from envs.pruning_engine import PruningEngine
from envs.server_settings import ServerSettings
from envs.vit.backbone_checkpoint import REFERENCE_BACKBONE, load_backbone, normalize
from envs.vit.data import load_split
from envs.vit.device import DEVICE_CHOICES, DTYPES, autocast_to, cpu_model, describe_device, resolve_device
from envs.vit.flops import ViTSpec, exact_budget_gflops, exact_budget_schedule, unpruned_gflops
from envs.vit.staged_vit import StagedViT
from envs.vit.timing import synchronize, timed_calls
from envs.vit.token_merge import REDUCTIONS
from envs.vit.token_ops import tokens_to_keep

Call = Callable[..., Any]  # call(method_name, *args) -> result, on an engine or a server
PRECISIONS = {"fp32": DTYPES["float32"], "bf16": DTYPES["bfloat16"]}
"""``--precision``'s short names (the results' ``precision`` column) for the precisions of ``DTYPES``."""


# -- episodes, as any caller of an engine or a server runs them -------------------------------------------


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
    """Loop full episodes until ``seconds`` have passed (the last one finishes; at least one), each on
    ``images_per_call`` random images, distinct unless there are fewer images: the engine runs the first
    stage once per distinct image, so repeats would flatter it."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    end = start + seconds
    latencies: list[float] = []
    episodes = 0
    while episodes == 0 or time.perf_counter() < end:
        keys = [f"{tag}-{episodes}-{i}" for i in range(images_per_call)]
        indices = rng.choice(num_images, images_per_call, replace=images_per_call > num_images).tolist()
        latencies += run_episode(call, keys, indices, ratio)
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


# -- the two kinds of rows ------------------------------------------------------------------------------


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forwards on ``device`` in ``precision`` (:data:`PRECISIONS`), as ``backbone.py`` trains under bf16. The
    engine reads its results back as float32 (``.float()``), so its answers keep their types."""
    return autocast_to(device, PRECISIONS[precision])


def bench_backbone(model: torch.nn.Module, staged: StagedViT, inputs: torch.Tensor, seconds: float,
                   precision: str) -> list[dict[str, Any]]:
    """Unpruned batched forwards of ``inputs`` (on the model's device), eval mode, no grad: the compute the
    engine's episodes are compared to."""
    rows = []
    for name, module in (("backbone: timm forward", model), ("backbone: StagedViT forward", staged)):
        def forward(module: torch.nn.Module = module) -> None:
            with torch.no_grad(), autocast(inputs.device, precision):
                module(inputs)

        times = timed_calls(forward, repeats=5, seconds=seconds, warmup=3, device=inputs.device)
        median = statistics.median(times)
        rows.append({"what": f"{name}, batch {len(inputs)}", "kind": "backbone", "precision": precision,
                     "images_per_s": len(inputs) / median, "calls": len(times),
                     "mean_call_ms": 1000 * statistics.mean(times), "median_call_ms": 1000 * median,
                     "p90_call_ms": 1000 * float(np.percentile(times, 90))})
    return rows


def engine_caller(engine: PruningEngine, precision: str) -> Call:
    """``call(method, *args)`` on ``engine`` under ``precision``, ending with a device sync, so a timer around it
    measures the work and not its launch."""
    def call(method: str, *args: Any) -> Any:
        with autocast(engine.device, precision):
            result = getattr(engine, method)(*args)
        synchronize(engine.device)
        return result

    return call


def bench_engine(engine: PruningEngine, sizes: list[int], seconds: float, ratio: float,
                 precision: str) -> list[dict[str, Any]]:
    """The engine called directly: episode logic without Ray, one caller, so no cross-caller batching."""
    call = engine_caller(engine, precision)
    num_images = len(engine.labels)
    warm_cache(call, num_images)
    rows = []
    for size in sizes:
        loop_episodes(call, 0.0, size, num_images, ratio, f"warm{size}", seed=0)  # one untimed episode
        forwards = engine.forwards
        run = loop_episodes(call, seconds, size, num_images, ratio, f"engine{size}", seed=size)
        row = episode_row(f"engine in-process, {size} images/call", "engine", [run], run["elapsed"])
        row["precision"] = precision
        row["forwards_per_request"] = (engine.forwards - forwards) / row["calls"]
        rows.append(row)
    return rows


class PrunedCost(NamedTuple):
    """The tokens each stage keeps at an exact budget, and the GFLOPs of the blocks of an unpruned and a pruned
    forward: a pruned episode can at best run ``gflops_unpruned / gflops_pruned`` times as fast as the backbone.
    The pruned count leaves out the features and the merging, the engine's work beyond the blocks, so that the
    ceiling is what the blocks alone allow."""

    schedule: list[int]
    gflops_unpruned: float
    gflops_pruned: float

    @classmethod
    def of(cls, model: torch.nn.Module, prune_points: tuple[int, ...], target_ratio: float) -> PrunedCost:
        spec = ViTSpec.from_model(model)
        schedule = exact_budget_schedule(spec.num_patches, len(prune_points), target_ratio)
        blocks_only = exact_budget_gflops(spec, prune_points, target_ratio, "drop", "none").total
        return cls(schedule, unpruned_gflops(spec), blocks_only)

    def ceiling(self, backbone_images_per_s: float) -> float:
        """The images/s of pruned forwards at the backbone's efficiency."""
        return backbone_images_per_s * self.gflops_unpruned / self.gflops_pruned

    def compare(self, rows: list[dict[str, Any]], backbone_images_per_s: float) -> None:
        """Add each row's images/s over the backbone's (``of_backbone``) and over the ceiling (``of_ceiling``)."""
        for row in rows:
            row["of_backbone"] = row["images_per_s"] / backbone_images_per_s
            row["of_ceiling"] = row["images_per_s"] / self.ceiling(backbone_images_per_s)


def measure(model: torch.nn.Module, config: dict, images: torch.Tensor, labels: torch.Tensor,
            args: argparse.Namespace, device: torch.device, precisions: list[str], sizes: list[int],
            cost: PrunedCost) -> list[dict[str, Any]]:
    """The backbone rows, then the engine rows at ``sizes`` images per call, at each precision, on ``device``;
    ``args`` holds the options of :func:`add_common_arguments`. Each row is compared with the timm forward of
    its precision, and printed as each precision ends, so a run cut short still shows what it got."""
    prune_points = tuple(args.prune_points)
    model = model.to(device).eval()
    inputs = normalize(images[torch.arange(args.batch) % len(images)].to(device), config)
    engine = PruningEngine(StagedViT(model, prune_points), config, images, labels, args.target_ratio,
                           args.reduction, device)
    rows = []
    for precision in precisions:
        measured = bench_backbone(model, StagedViT(model, prune_points).eval(), inputs, args.seconds, precision)
        measured += bench_engine(engine, sizes, args.seconds, args.target_ratio, precision)
        cost.compare(measured, measured[0]["images_per_s"])
        for row in measured:
            print(f"  {row['what']}, {precision}: {row['images_per_s']:.1f} images/s "
                  f"({row['of_ceiling']:.2f} of the pruned ceiling)", flush=True)
        rows += measured
    return rows


# -- report ---------------------------------------------------------------------------------------------


def machine_info(torch_threads: int, device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (the GPU's name when on one); the load average says how busy the
    machine was."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "device": describe_device(device), "torch_threads": torch_threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def describe_machine(machine: dict[str, Any], load_at_start: list[float]) -> str:
    """One line naming the machine, for under a table."""
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), device "
            f"{machine['device']}, torch threads {machine['torch_threads']}, torch "
            f"{machine['torch']}, load average {load_at_start} at start, {machine['load_avg_1_5_15']} at end")


Column = tuple[str, str, int]  # header, row key, digits after the point
COLUMNS: list[Column] = [("measurement", "what", 0), ("precision", "precision", 0), ("images/s", "images_per_s", 1),
                         ("÷ backbone", "of_backbone", 2), ("÷ pruned ceiling", "of_ceiling", 2),
                         ("calls", "calls", 0), ("mean call ms", "mean_call_ms", 2), ("p90 call ms", "p90_call_ms", 2)]


def markdown_table(rows: list[dict[str, Any]], columns: list[Column] = COLUMNS) -> str:
    """One line per row; a cell is empty where a row lacks the column's key."""
    def cell(value: Any, digits: int) -> str:
        if value is None:
            return ""
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key), digits) for _, key, digits in columns) + " |" for row in rows]
    return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and ``server_throughput`` share: backbone, images, problem, timing."""
    problem = PruningProblem()
    parser.add_argument("--backbone", default=str(REFERENCE_BACKBONE) if REFERENCE_BACKBONE.exists() else None,
                        required=not REFERENCE_BACKBONE.exists(), help="backbone checkpoint directory")
    add_data_dir_argument(parser)
    parser.add_argument("--dataset", default=problem.dataset, help="the data set the images come from")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"), help="the split they are read from")
    parser.add_argument("--limit", type=positive_int, default=512, help="images served (each one warmed once)")
    parser.add_argument("--batch", type=positive_int, default=64, help="backbone batch size")
    parser.add_argument("--seconds", type=non_negative_float, default=10.0,
                        help="per measurement (default: %(default)s; 0: only the few calls each takes at least)")
    parser.add_argument("--torch-threads", type=positive_int, default=ServerSettings().torch_threads,
                        help="torch threads of the engine, as a ViT server's")
    parser.add_argument("--target-ratio", type=removal_ratio, default=problem.target_ratio,
                        help="fraction of live patch tokens removed at each pruning point")
    parser.add_argument("--prune-points", type=block_indices, default=problem.prune_points,
                        help="comma-separated blocks, as train.py's")
    parser.add_argument("--reduction", default=problem.reduction, choices=REDUCTIONS,
                        help="what removed tokens become (merge: into their most similar kept token)")
    parser.add_argument("--output", help="also write the results as JSON here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    add_common_arguments(parser)
    parser.add_argument("--device", default="auto", help=DEVICE_CHOICES)
    parser.add_argument("--engine-images", type=positive_int, nargs="+",
                        default=sorted({PruningProblem().images_per_env, ServerSettings().max_batch}),
                        help="images per engine call (default: %(default)s: one env's request, train.py's "
                             "--images-per-env, and a ViT server's largest batch)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                        help="precisions to time (bf16: the forwards under autocast)")
    parser.add_argument("--random-images", action="store_true",
                        help="random uint8 images instead of the data set (a box without it): the engine does "
                             "the same work on any pixels, as its episodes here keep a fixed token count; "
                             "--data-dir, --dataset and --split are refused with it")
    args = parser.parse_args(argv)
    unread = sorted(given_flags(parser, argv) & {"data_dir", "dataset", "split"}) if args.random_images else []
    if unread:
        parser.error(f"{', '.join(map(flag_name, unread))}: --random-images reads no data "
                     f"set: drop {'it' if len(unread) == 1 else 'them'}")
    if max(args.engine_images) > args.limit:
        parser.error(f"--limit {args.limit} is below --engine-images {max(args.engine_images)}: each engine call "
                     "takes distinct images")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.torch_threads)  # the server's setting, so the comparison is like for like
    load_at_start = machine_info(args.torch_threads, device)["load_avg_1_5_15"]
    model, config = load_backbone(args.backbone)
    if args.random_images:
        generator = torch.Generator().manual_seed(0)
        size = config["input_size"]
        images = torch.randint(0, 256, (args.limit, 3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, config["num_classes"], (args.limit,), generator=generator)
        source = "random"
    else:
        split = load_split(args.dataset, args.split, args.data_dir, input_size=config["input_size"], limit=args.limit)
        images, labels, source = split.images, split.labels, f"{args.dataset} {args.split}"
    print(f"backbone {args.backbone} ({config['model_name']}), {len(labels)} {source} images, "
          f"{describe_device(device)}, torch threads {args.torch_threads}", flush=True)

    cost = PrunedCost.of(model, tuple(args.prune_points), args.target_ratio)
    rows = measure(model, config, images, labels, args, device, args.precision, args.engine_images, cost)
    machine = machine_info(args.torch_threads, device)
    table = markdown_table(rows)
    print()
    print(f"Episodes keep tokens_to_keep(n, {args.target_ratio}) tokens per pruning point: {cost.schedule}, "
          f"{cost.gflops_pruned / cost.gflops_unpruned:.2f}x the GFLOPs of an unpruned forward; each image is "
          "one episode, so images/s is episodes/s. Engine rows ran after a warm-up pass over all images.")
    print()
    print(table)
    print()
    print(describe_machine(machine, load_at_start))
    print("Command: " + " ".join(sys.orig_argv))
    result = {"args": vars(args), "machine": machine, **cost._asdict(), "rows": rows, "table": table}
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    run_from_command_line(main)
