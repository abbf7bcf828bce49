"""Where to prune: at one cost, how much the choice of pruning points matters.

    python -m benchmarks.schedule_headroom --data-dir ../shared/data      # about 3 minutes on a 2-core CPU

A pruning problem removes the same fraction of the live patch tokens at each of its pruning points (before
blocks 3, 6 and 9 by default), while ToMe merges a few tokens in every block. This compares schedules at one
cost: that of greedy similarity removing ``--budget`` at the checkpoint's pruning points (the reference
schedule). Each schedule of ``--schedules`` prunes at the removal ratio whose greedy-similarity GFLOPs are at
most that cost (``envs.vit.flops.matching_ratio``), and every heuristic of ``--selections`` chooses the tokens
there; ToMe merges in every block at the same cost. All run on validation images (never the test split), and
each row's accuracy is compared with greedy similarity's at the reference schedule on the same images (paired
bootstrap 95% interval).

A schedule is a problem setting that applies to every method: ``train.py --prune-points 1,3,5,7,9,11
--target-ratio R`` trains the agents at it, and evaluate.py then compares them with the heuristics at the same
schedule and with ToMe at the agents' cost. The agents' networks add their own cost, so their ``R`` is
``matching_ratio`` with ``scores="agents"`` and their ``policy_macs_per_token``, a little above the printed one.

Measured (reference backbone, 2,000 validation images, this 2-core CPU): see benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from benchmarks import add_data_and_checkpoint_arguments, benchmark_parser, checkpoint_backbone, run_from_command_line
from cli import positive_int
from envs.problem import block_indices, removal_ratio
from envs.vit.flops import ViTSpec, exact_budget_gflops, matching_ratio
from envs.vit.held_out import load_checked_split
from envs.vit.staged_vit import StagedViT
from evaluation.compare import paired_difference
from evaluation.methods import HEURISTIC_ROWS, Method
from evaluation.predictions import cost, predict, quality
from evaluation.results_table import BASELINE

DEFAULT_SCHEDULES = ("2,5,8", "2,4,6,8", "2,4,6,8,10", "1,3,5,7,9,11", "1,2,3,4,5,6,7,8,9,10,11")


def matched_ratio(spec: ViTSpec, reference: tuple[int, ...], points: tuple[int, ...], budget: float,
                  reduction: str) -> float:
    """The removal ratio at pruning points ``points`` whose greedy-similarity GFLOPs are at most greedy
    similarity's removing ``budget`` at ``reference``: ``budget`` itself when the points are the reference."""
    if points == reference:
        return budget
    target = exact_budget_gflops(spec, reference, budget, reduction, "similarity").total
    return matching_ratio(spec, points, target, reduction, "similarity")


def schedule_methods(spec: ViTSpec, schedules: Sequence[tuple[int, ...]], budget: float, reduction: str,
                     selections: Sequence[str]) -> list[tuple[tuple[int, ...], Method]]:
    """Per schedule, one row per selection at the ratio matching greedy similarity's cost at ``budget`` on the
    first schedule (the reference, which keeps ``budget`` itself), and ToMe at that cost on the reference."""
    reference = schedules[0]
    rows = []
    for points in schedules:
        ratio = matched_ratio(spec, reference, points, budget, reduction)
        rows += [(points, Method(HEURISTIC_ROWS[selection], selection, ratio)) for selection in selections]
    return [*rows, (reference, Method(HEURISTIC_ROWS["tome"], "tome", budget))]


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone, data split, reduction and pruning points (the reference "
                                              "schedule)")
    parser.add_argument("--budget", type=removal_ratio, default=0.7,
                        help="removal ratio at the reference schedule that sets the cost (default: %(default)s)")
    parser.add_argument("--schedules", type=block_indices, nargs="+",
                        default=list(map(block_indices, DEFAULT_SCHEDULES)),
                        help="pruning points of the other schedules (default: %(default)s)")
    parser.add_argument("--selections", nargs="+", default=["similarity", "distinct", "random"],
                        help="heuristics to run at each schedule; greedy similarity always runs (default: %(default)s)",
                        choices=[selection for selection in HEURISTIC_ROWS if selection != "tome"])
    parser.add_argument("--images", type=positive_int, default=2000, help="validation images (default: %(default)s)")
    args = parser.parse_args(argv)

    problem, staged, config = checkpoint_backbone(args.checkpoint)
    spec = ViTSpec.from_model(staged.vit)
    schedules = [staged.prune_points, *(points for points in args.schedules if points != staged.prune_points)]
    stages = {points: StagedViT(staged.vit, points).eval() for points in schedules}
    methods = schedule_methods(spec, schedules, args.budget, problem.reduction,
                               ["similarity", *(s for s in args.selections if s != "similarity")])
    split = load_checked_split(problem.dataset, "val", args.data_dir, config, val_size=problem.val_size,
                               seed=problem.split_seed, limit=args.images)
    baseline = Method(BASELINE, "baseline")
    models = {baseline: baseline.model(staged, config, problem.reduction),
              **{method: method.model(stages[points], config, problem.reduction) for points, method in methods}}
    outputs = predict(models, split, 250)  # every batch read once for all rows
    unpruned = outputs[baseline][0]
    print(f"{len(split)} validation images; the unpruned model: "
          f"{quality(unpruned, split.labels, unpruned)['accuracy']:.2f}%; the cost: greedy similarity removing "
          f"{args.budget} at pruning points {staged.prune_points}")

    rows, correct = [], {}
    for points, method in methods:
        model, (predictions, kept) = models[method], outputs[method]
        correct[points, method.name] = (predictions == split.labels).numpy().astype(float)
        measured = quality(predictions, split.labels, unpruned)
        rows.append({"pruning points": ",".join(map(str, points)), "method": method.name,
                     "ratio": "" if method.selection == "tome" else f"{method.budget:.3f}",
                     "kept per stage": ",".join(map(str, model.schedule())),
                     "GFLOPs": cost(model, kept)["gflops"], "accuracy": measured["accuracy"],
                     "agreement": measured["agreement"]})
    reference = correct[staged.prune_points, HEURISTIC_ROWS["similarity"]]
    intervals = [paired_difference(correct[key], reference) for key in correct]
    table = pd.DataFrame(rows).assign(**{"vs reference": [f"{d:+.2f} [{low:+.2f}, {high:+.2f}]"
                                                          for d, low, high in intervals]})
    print(table.to_markdown(index=False, floatfmt=("", "", ".3f", "", ".4f", ".2f", ".2f", "")))


if __name__ == "__main__":
    run_from_command_line(main)
