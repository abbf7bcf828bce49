"""Batch-1 speed of the pruned ViT against the unpruned one, eager and compiled, the rows timed in turns; no Ray.

One image at a time, a forward is bound by per-operation overhead (Python and kernel launches), not by the
arithmetic that pruning saves, and a pruned forward runs more, smaller operations than the unpruned one
(features, policy networks and merging at each pruning point). Users of token pruning see exactly this: fewer
GFLOPs, no faster (or slower) at batch 1. ``torch.compile`` removes most of that overhead: each selection's
forward is one graph (``PrunedViT.forward``), and on a GPU ``mode="reduce-overhead"`` replays it as a CUDA
graph, one launch per forward.

A machine shared with other work drifts by tens of percent within a minute at batch 1, more than the
differences measured, so the rows are timed in turns, as evaluate.py times its columns: each round times every
row once, on the same images, and each row's figure is its median over the rounds. Its ratio to the unpruned
row is taken within each round, then the median and the quartiles over the rounds are printed.
Rows: the unpruned model, the policy (MARL exact), greedy similarity and Distinctive NMS, at the policy's
budget. The images are the first few of the test split, as evaluate.py times its rows on test images: only
time is read from them, never an answer.

Run from the repository root::

    python -m benchmarks.batch1_latency --data-dir ../shared/data                # the CPU; about 4 minutes
    python -m benchmarks.batch1_latency --data-dir ../shared/data --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import add_data_dir_argument, benchmark_parser, run_from_command_line, write_json
from cli import positive_int
from envs.vit.backbone_checkpoint import REFERENCE_POLICY
from envs.vit.data import load_split
from envs.vit.device import DEVICE_CHOICES, DTYPES, autocast_to, describe_device, resolve_device
from envs.vit.timing import ratios_within_rounds
from evaluation.methods import HEURISTIC_ROWS, MARL_EXACT, Method
from evaluation.results_table import BASELINE
from evaluation.speed import timed_in_turns
from policies.pruned_vit import PrunedViT

HEURISTICS = ("similarity", "distinct")


def rows(policy: PrunedViT) -> dict[str, PrunedViT]:
    """New models of the unpruned model, the policy and the heuristics at its budget, all on its backbone
    module, built as evaluate.py builds its rows."""
    methods = [Method(BASELINE, "baseline"),
               Method(MARL_EXACT, "policy", policy.budget, dict(policy.policies), policy.protected_share),
               *(Method(HEURISTIC_ROWS[selection], selection, policy.budget) for selection in HEURISTICS)]
    return {method.name: method.model(policy.staged, policy.backbone_config, policy.reduction)
            for method in methods}


def summary(rates: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per row: the median images/s over rounds, and its ratio to ``reference`` within each round: median and
    quartiles."""
    result = {}
    for name, ratios in ratios_within_rounds(rates, reference).items():
        low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
        result[name] = {"images_per_s": statistics.median(rates[name]), "ratio": median, "ratio_q1": low,
                        "ratio_q3": high}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--checkpoint", default=str(REFERENCE_POLICY), help="the policy (default: the reference)")
    add_data_dir_argument(parser)
    parser.add_argument("--images", type=positive_int, default=32,
                        help="test images per timed pass, whole batches (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="images per timed forward (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=15, help="timed rounds per mode (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"),
                        help="eager: the models as they are; compiled: after torch.compile")
    parser.add_argument("--device", default="auto", help=DEVICE_CHOICES)
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="the forwards' precision (bfloat16: under autocast)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (quartiles over rounds), got {args.rounds}")
    if args.images % args.batch_size:
        parser.error(f"--images {args.images}: a timed pass is whole batches of --batch-size {args.batch_size}, so "
                     f"--images must be a multiple of it")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    policy = PrunedViT.from_checkpoint(args.checkpoint).to(device)
    config = policy.backbone_config
    split = load_split(config["dataset"], "test", args.data_dir, limit=args.images, input_size=config["input_size"])
    images = policy.normalize(split.images.to(device))
    results: dict[str, Any] = {"device": describe_device(device), "dtype": args.dtype,
                               "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
                               "images": len(images), "rounds": args.rounds, "budget": policy.budget}
    for mode in args.modes:
        models = rows(policy)  # afresh for each mode: a compiled model stays compiled
        with autocast_to(device, DTYPES[args.dtype]):
            rates = timed_in_turns(models, {args.batch_size: images}, args.rounds,  # evaluate.py --compile's way
                                   compile_on=device if mode == "compiled" else None)[args.batch_size]
        results[mode] = summary(rates, BASELINE)
        print(f"\n{mode}, batch {args.batch_size}, {results['device']}, {args.dtype}, "
              f"{results['torch_threads']} threads, {args.rounds} rounds:")
        for name, row in results[mode].items():
            print(f"  {name:20s} {row['images_per_s']:8.1f} images/s   {row['ratio']:.2f}x the unpruned "
                  f"[{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}]")
    write_json(args.output, results)
    return results


if __name__ == "__main__":
    run_from_command_line(main)
