"""Is the gain learned? A trial's policy before PPO (its warm start) and after, on validation images.

    HOME=$(mktemp -d) python -m benchmarks.learned_vs_warm_start runs/marl/target_ratio=0.5 --data-dir ../shared/data

For the warm-start modules (``<trial>/warm_start``) and the trial's best checkpoint, on ``--limit`` validation
images (never the test split) drawn from those the trial did not rank its checkpoints by (the best of many
checkpoints on the ``val_limit`` images that ranked them reads high on those very images): exact-budget
accuracy and agreement with the unpruned model, the paired difference to greedy similarity with a bootstrap
95% interval, and how often the tokens that reach the head (their original patch positions) differ from greedy
similarity's, from the pair of heuristics the warm start imitated (greedy attention's protected share, then
the warm-start heuristic among the rest) and from that heuristic alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks import add_data_dir_argument, benchmark_parser, run_from_command_line
from cli import positive_int
from envs.errors import UsageError
from envs.vit.backbone_checkpoint import normalize
from envs.vit.data import limited_positions
from envs.vit.held_out import load_checked_split
from envs.vit.pruned_forward import Selector, TokenState, exact_forward
from envs.vit.scoring import percent_equal
from evaluation.compare import paired_difference
from policies.checkpoints import (
    PolicyCheckpointError,
    best_on_validation,
    load_module,
    load_policies,
    trial_checkpoints,
)
from policies.decisions import policy_selector
from policies.heuristics import heuristic_selector
from policies.pruned_vit import policy_backbone
from policies.warm_start import imitated_selector


def kept_positions(select: Selector) -> tuple[Selector, dict[int, list[torch.Tensor]]]:
    """``select``, recording at each pruning point (by its index) the original patch positions each image keeps,
    sorted, ``-1`` for the tokens it does not: one ``[B, W]`` tensor per call."""
    kept: dict[int, list[torch.Tensor]] = defaultdict(list)

    def recording(state: TokenState, k: int) -> torch.Tensor:
        keep = select(state, k)
        kept[state.stage].append(state.positions.masked_fill(~keep, -1).sort(dim=1).values)
        return keep
    return recording, kept


def unranked_positions(size: int, ranked: int, limit: int, seed: int) -> np.ndarray:
    """Positions, ascending, of a seeded subset of ``limit`` images of a validation split of ``size``, none of them
    among the ``ranked`` that train.py scored its checkpoints on (``load_split``'s ``limit`` subset)."""
    others = np.setdiff1d(np.arange(size), limited_positions(size, ranked, seed))
    if len(others) == 0:
        raise UsageError(f"the trial ranked its checkpoints on all {size} validation images: none is left to score")
    return others[limited_positions(len(others), limit, seed)]


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("trial", type=Path, help="a trial directory of train.py (holds warm_start/ and checkpoints)")
    add_data_dir_argument(parser)
    parser.add_argument("--limit", type=positive_int, default=2000,
                        help="validation images, of those the trial did not rank checkpoints on")
    parser.add_argument("--batch-size", type=positive_int, default=250, help="images per forward")
    args = parser.parse_args(argv)

    if not Path(args.trial).is_dir():
        raise PolicyCheckpointError(f"{args.trial} does not exist: pass a trial directory of train.py "
                                    f"(<output-dir>/target_ratio=0.5)")
    checkpoint = best_on_validation(trial_checkpoints(args.trial))
    if checkpoint is None:
        raise PolicyCheckpointError(f"{args.trial} holds no validated checkpoint: pass a trial directory of train.py")
    modules, info = load_policies(checkpoint)
    problem = info.problem
    staged, config, _ = policy_backbone(problem, checkpoint)
    warm_start = args.trial.resolve() / "warm_start"
    warm = {policy: load_module(warm_start / policy, policy) for policy in modules}
    split = load_checked_split(problem.dataset, "val", args.data_dir, config, val_size=problem.val_size,
                               seed=problem.split_seed)
    scored = unranked_positions(len(split), problem.val_limit, args.limit, problem.split_seed)
    images, labels = split.images[scored], split.labels[scored]
    share = problem.protected_share
    rows = {"before PPO (warm start)": policy_selector(warm, staged, problem.target_ratio, share),
            f"after PPO ({checkpoint.name}, iteration {info.iteration})":
                policy_selector(modules, staged, problem.target_ratio, share),
            "greedy similarity": heuristic_selector("similarity"),
            "imitated (the heuristics taking the turns)":
                imitated_selector(problem.target_ratio, problem.warm_start, problem.agents, share),
            f"{problem.warm_start} alone": heuristic_selector(problem.warm_start)}
    last_point = len(staged.prune_points) - 1
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in rows}
    positions: dict[str, dict[int, list[torch.Tensor]]] = {}
    recorders = {}
    for name, select in rows.items():
        recorders[name], positions[name] = kept_positions(select)
    unpruned = []
    with torch.no_grad():
        for start in range(0, len(labels), args.batch_size):
            inputs = normalize(images[start:start + args.batch_size], config)
            unpruned.append(staged.vit(inputs).argmax(1))
            for name, select in recorders.items():
                logits = exact_forward(staged, inputs, select, problem.target_ratio, problem.reduction)
                predictions[name].append(logits.argmax(1))
    labels, unpruned = labels.numpy(), torch.cat(unpruned)
    correct = {name: (torch.cat(p).numpy() == labels).astype(float) for name, p in predictions.items()}
    kept = {name: torch.cat(p[last_point]) for name, p in positions.items()}  # the tokens that reach the head
    greedy, imitated, alone = list(rows)[2:]
    print(f"{checkpoint}: {len(labels)} validation images, none of the {problem.val_limit} that ranked its "
          f"checkpoints; r = {problem.target_ratio}")
    print(f"{'selection':<46} {'acc %':>6} {'agree %':>8} {'vs greedy':>10} {'95% CI':>16} "
          f"{'sets != greedy':>15} {'!= imitated':>12} {'!= ' + problem.warm_start:>14}")
    for name in rows:
        difference, low, high = paired_difference(correct[name], correct[greedy])
        differ = {other: 100 * (kept[name] != kept[other]).any(dim=1).double().mean().item()
                  for other in (greedy, imitated, alone)}
        agree = percent_equal(torch.cat(predictions[name]), unpruned)
        print(f"{name:<46} {100 * correct[name].mean():6.2f} {agree:8.2f} "
              f"{difference:+10.2f} [{low:+6.2f}, {high:+6.2f}] {differ[greedy]:14.1f}% {differ[imitated]:11.1f}% "
              f"{differ[alone]:13.1f}%")


if __name__ == "__main__":
    run_from_command_line(main)
