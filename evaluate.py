"""Evaluate trained token-pruning policies against baselines; print and save the results table.

    python evaluate.py --data-dir ../shared/data                   # the committed policy, test split
    python evaluate.py --checkpoint runs/marl/target_ratio=0.5/checkpoint_000005 --split val --limit 2000 --no-speed
    python evaluate.py --heuristics-only --backbone runs/backbone/backbone --data-dir ../shared/data  # no policy
    python evaluate.py --data-dir ../shared/data --device cuda --dtype bfloat16 --speed-batch-sizes 1,256,1024

No Ray cluster: only the policy modules are loaded from the checkpoint (from its export, safetensors and
JSON, when it has one: ``policies.export``), and each row's pruned ViT (``policies.pruned_vit.PrunedViT``)
runs here, in batches. One row per method and budget (``budget`` = ``target_ratio``, see docs/DESIGN.md):

- ``Baseline (unpruned)``: the timm model's own forward.
- ``Random``, ``Greedy attention`` (top-k class attention, EViT), ``Greedy similarity``, ``Attention NMS``,
  ``Distinctive NMS`` (``policies.heuristics``): exact budget, at every budget of ``--budgets`` and of the
  checkpoints.
- ``ToMe`` (``envs.vit.tome``): merging in every block, at the GFLOPs of the dearest other row at its budget
  (the agents' where a policy is evaluated; ``evaluation.methods.match_tome_cost``).
- ``MARL exact``: both agents, each choosing its most likely set in turn: the attention agent the tokens it
  keeps, the similarity agent those it removes among the others (``policies.decisions.policy_selector``).
- ``MARL attention only`` / ``MARL similarity only``: one module of the pair alone, exact budget. A
  checkpoint trained with one agent gives only its row.
- ``Cascade (greedy similarity)``, with ``--cascade FIRST,SECOND``: a budget per image
  (``policies.cascade``). Greedy similarity removes FIRST at ``--cascade-points`` on every image, and the
  least sure images run again removing SECOND, as many as keep the mean GFLOPs at greedy similarity's at the
  checkpoint's budget. That share is calibrated on the validation split (or ``--calibration-images`` of it),
  so the row is measured on another split; its GFLOPs are the mean measured there. It counts as a heuristic
  in the learned rows' ``delta_best_heuristic``.
- ``MARL cascade``: the same with both agents choosing the tokens of both forwards, when ``--cascade-points``
  are the checkpoint's pruning points (the agents were trained on those).
MARL rows come at the checkpoint's own ``target_ratio``, at the budgets of ``--budgets`` it was trained at
(``train.py --train-ratios``) and at those of ``--checkpoints-per-budget``.
Every pruned row but ToMe removes tokens the same way: the checkpoint's ``reduction`` unless ``--reduction`` says
otherwise (``envs.vit.token_merge``); ToMe merges by its own matching whatever the reduction (dropping in every
block would not be ToMe), at the cost of the rows that reduce so. GFLOPs come from ``PrunedViT.gflops``
(``envs.vit.flops``) per image; the columns are defined in ``evaluation.results_table.COLUMNS`` (also written to
results.md and results.json); every row's answer on every image goes to predictions.csv.gz
(``evaluation.predictions.per_image_predictions``).
Learned and cascade rows are compared with the heuristic most accurate at their budget on ``--selection-images``
validation images (with ``--split val``, on the evaluated images).
Every row runs on ``--device`` (a GPU when one is visible, by default): the backbone, the policy modules, the
images, the heuristics, merging, ToMe and the cascade; in float32 or, with ``--dtype bfloat16``, every forward
under ``torch.autocast`` to bfloat16 (the token counts stay exact; ties in the scores may break otherwise).
The rows are timed in turns at each of ``--speed-batch-sizes`` with the project's one timer, synchronised with
the device (``envs.vit.timing``); results.json records the device, the dtype and which images were timed. With
``--compile`` the timed forwards are compiled (``torch.compile``, one graph per row; on a GPU
``mode="reduce-overhead"``, which replays CUDA graphs, the way to batch-1 latency there); the other columns
come from the eager forwards either way.
Numbers other than timings are deterministic for the same inputs, ``--seed``, ``--batch-size``, ``--device``
and ``--dtype``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cli import (
    OneLineParser,
    add_data_access_arguments,
    check_output_dir,
    code_commit,
    comma_separated,
    data_access,
    named_directory,
    output_directory,
    positive_int,
    random_seed,
    run_command_line,
    versions_line,
)
from envs.errors import UsageError
from envs.problem import (
    PruningProblem,
    block_indices,
    budget_key,
    flag_name,
    removal_ratio,
    removal_ratios,
    spelled_points,
)
from envs.vit.backbone_checkpoint import (
    NOT_A_CLONE,
    REFERENCE_BACKBONE,
    REFERENCE_POLICY,
    REPO_ROOT,
    installed_without_repository,
    is_backbone_checkpoint,
    repository_relative,
)
from envs.vit.data import DATASETS, ClassesDiffer, DataError, ImageSplit, default_data_dir, limited_positions
from envs.vit.device import DEVICE_CHOICES, DTYPES, describe_device, resolve_device
from envs.vit.held_out import check_held_out, load_checked_split
from envs.vit.staged_vit import DEFAULT_PRUNE_POINTS, PrunePointsError, StagedViT
from envs.vit.token_merge import REDUCTIONS
from evaluation import EvaluationError
from evaluation.measure import Evaluation, evaluate_methods
from evaluation.methods import CASCADE, CascadePasses, plan_methods, warn_of_dear_cascades
from evaluation.results_table import RESULT_FILES, SPEED_BATCH_SIZES, header_line, markdown_table, write_results
from evaluation.speed import speed_note
from policies.checkpoints import (
    CheckpointInfo,
    Modules,
    PolicyCheckpointError,
    holds_policies,
    load_policies,
)
from policies.pruned_vit import checked_backbone
from policies.token_scorer import TokenScoring

DEFAULT_CHECKPOINT = REFERENCE_POLICY
CASCADE_PRUNE_POINTS = (1, 3, 5, 7, 9, 11)
"""``--cascade-points`` unless given: six pruning points, where cascade_headroom's best pairs prune
(benchmarks/README.md)."""
CHOSEN_ON_VALIDATION = "the best heuristic of each budget is chosen on validation images"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    policy = parser.add_argument_group("what is evaluated")
    policy.add_argument("--checkpoint", type=lambda text: Path(named_directory(text)), default=DEFAULT_CHECKPOINT,
                        help="policy checkpoint directory written by train.py (default: reference/marl_policy)")
    policy.add_argument("--backbone", type=named_directory, default=None,
                        help="backbone checkpoint directory (default: the policy checkpoint's, else "
                             f"{REFERENCE_BACKBONE.relative_to(REPO_ROOT)})")
    policy.add_argument("--heuristics-only", action="store_true",
                        help="no policy: the heuristics, ToMe and --cascade on --backbone, e.g. to see what the agents "
                             "will have to beat before training them")
    policy.add_argument("--prune-points", type=block_indices, default=None,
                        help=f"with --heuristics-only, the blocks before which tokens are pruned (default: "
                             f"{spelled_points(DEFAULT_PRUNE_POINTS)}; a checkpoint brings its own)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=named_directory, default=default_data_dir(),
                      help="where the data set lives (default: $MARL_PRUNING_DATA_DIR, else ./data)")
    data.add_argument("--dataset", default=None, choices=DATASETS,
                      help="data set (default: the checkpoint's, or --backbone's)")
    add_data_access_arguments(data)
    data.add_argument("--split", default="test", choices=("val", "test"),
                      help="test for final numbers, val (the backbone's held-out subset) for development "
                           "(default: %(default)s)")
    data.add_argument("--limit", type=positive_int, default=None, metavar="N",
                      help="evaluate a seeded subset of N images (the heuristic that learned rows are compared "
                           "with is still chosen on --selection-images, a cascade calibrated on "
                           "--calibration-images)")
    rows = parser.add_argument_group("rows")
    rows.add_argument("--budgets", type=_budgets, default="0.3,0.5,0.7",
                      help="target ratios of the heuristic rows, comma-separated; the checkpoints' own ratios "
                           "(--checkpoint's, --checkpoints-per-budget's, and a --train-ratios checkpoint's among "
                           "these) get MARL rows and the heuristic rows beside them (default: %(default)s)")
    rows.add_argument("--reduction", default=None, choices=REDUCTIONS,
                      help="what pruned rows do with removed tokens, but ToMe's, which always merges (default: "
                           "the checkpoint's)")
    rows.add_argument("--checkpoints-per-budget", type=_checkpoints_per_budget, default={},
                      metavar="RATIO=PATH,...", help="more policy checkpoints, each evaluated at its budget")
    rows.add_argument("--seed", type=random_seed, default=0, help="seed of the Random baseline (default: 0)")
    cascade = parser.add_argument_group("cascade row")
    cascade.add_argument("--cascade", type=_cascade_ratios, default=None, metavar="FIRST,SECOND",
                         help="add a cascade row at the checkpoint's budget (with --heuristics-only, the middle one of "
                              "--budgets): greedy similarity removing FIRST, then SECOND on the least sure images "
                              "(e.g. 0.35,0.1)")
    cascade.add_argument("--cascade-points", type=block_indices, default=None,
                         help="with --cascade: its pruning points (default: "
                              f"{spelled_points(CASCADE_PRUNE_POINTS)})")
    cascade.add_argument("--calibration-images", type=positive_int, default=None,
                         help="with --cascade: validation images it is calibrated on (default: all of them)")
    rows.add_argument("--selection-images", type=positive_int, default=2000,
                      help="with --split test: validation images the heuristic that learned rows are compared "
                           "with is chosen on, per budget, so that it is not chosen on the test images (--split val "
                           "chooses it on the evaluated images; default: %(default)s)")
    run = parser.add_argument_group("where and how it runs")
    run.add_argument("--device", default="auto",
                     help=f"where every row runs: {DEVICE_CHOICES} (default: %(default)s, a GPU when one is "
                          "visible)")
    run.add_argument("--dtype", default="float32", choices=DTYPES,
                     help="bfloat16 runs every forward under torch.autocast to it (default: %(default)s)")
    run.add_argument("--batch-size", type=positive_int, default=256,
                     help="images per forward for the accuracy and GFLOPs columns (the timed batches are "
                          "--speed-batch-sizes) (default: %(default)s)")
    run.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    speed = parser.add_argument_group("timing")
    speed.add_argument("--speed-batch-sizes", type=_batch_sizes, default=SPEED_BATCH_SIZES, metavar="N,...",
                       help="batch sizes timed, one images_per_s_bN column each; speedup is at the largest "
                            f"(default: {','.join(map(str, SPEED_BATCH_SIZES))})")
    speed.add_argument("--speed-repeats", type=positive_int, default=5,
                       help="timing rounds, each timing every row once, in turns (default: %(default)s)")
    speed.add_argument("--no-speed", action="store_true", help="skip the timing columns")
    speed.add_argument("--compile", action="store_true",
                       help="time each row's forward compiled by torch.compile (CUDA graphs on a GPU); compiling "
                            "takes 30 s to 2 min per row on a 2-core CPU")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", type=lambda text: Path(output_directory(text)), default=Path("results"),
                        help="where results.csv, .json, .md, predictions.csv.gz and, with several budgets, the plot "
                             "are written (default: %(default)s)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the results files (results.csv, .json, .md, predictions.csv.gz, the plot) of an "
                             "earlier run")
    return parser


def _budgets(text: str) -> list[float]:
    """``0.3,0.5,0.7`` -> sorted distinct ratios."""
    return sorted(set(removal_ratios(text)))


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``1,256,1024`` -> the distinct batch sizes, ascending."""
    return tuple(sorted(set(comma_separated(positive_int, "batch sizes")(text))))


def _cascade_ratios(text: str) -> tuple[float, float]:
    """``0.35,0.1`` -> the removal ratios of a cascade's first and second forwards."""
    ratios = removal_ratios(text)
    if len(ratios) != 2:
        raise argparse.ArgumentTypeError(f"expected two removal ratios, FIRST,SECOND, got {text!r}")
    return ratios


def _checkpoints_per_budget(text: str) -> dict[float, Path]:
    """``0.3=PATH,0.7=PATH`` -> ``{0.3: PATH, 0.7: PATH}``. A comma starts a pair only before ``RATIO=``: the
    trial directories of a sweep over several settings have commas in their names (``target_ratio=0.3,lr=0.001``).
    An empty pair (``0.3=a,,0.7=b``, a comma at either end) is refused, as :func:`cli.comma_separated` refuses an
    empty value; the comma before an empty pair ends the path before it (``a,``), so no path may end in a comma."""
    out: dict[float, Path] = {}
    pairs = [part.strip() for part in re.split(r",(?=\s*[-+.\deE]*\s*=)", text)]  # a ratio may be mistyped or missing
    if "" in pairs or any(part.endswith(",") for part in pairs):
        raise argparse.ArgumentTypeError(f"expected comma-separated RATIO=PATH pairs with none empty, got {text!r}")
    for part in pairs:
        ratio, sep, path = part.partition("=")
        try:
            if not sep or not path.strip():
                raise argparse.ArgumentTypeError("no path")
            budget = removal_ratio(ratio)
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"expected RATIO=PATH pairs (such as 0.3=runs/marl/checkpoint), got "
                                             f"{part!r} ({error})") from None
        if budget in out:
            raise argparse.ArgumentTypeError(f"budget {budget:g} is given twice")
        out[budget] = Path(path.strip())
    return out


def check_flags(args: argparse.Namespace, given: Collection[str]) -> None:
    """An :class:`EvaluationError` for flags that contradict each other, or a flag ``given`` on the command line
    (:func:`cli.given_flags`) that the other flags leave without effect: a flag ignored without a word would
    leave its user reading results of settings they did not ask for."""
    def refuse(flags: Iterable[str], reason: str) -> None:
        named = [flag for flag in flags if flag in given]
        if named:
            raise EvaluationError(f"{flag_name(named[0])} {reason}")

    if args.cascade and args.split == "val":
        raise EvaluationError("the cascade is calibrated on the validation split: evaluate it on --split test")
    if not args.cascade:
        refuse(("cascade_points", "calibration_images"), "is for --cascade FIRST,SECOND, which was not given")
    if args.heuristics_only:
        refuse(("checkpoint", "checkpoints_per_budget"), "names a policy checkpoint: --heuristics-only evaluates none")
    else:
        refuse(("prune_points",), "is for --heuristics-only: a checkpoint prunes where it was trained to")
    if args.split == "val":
        refuse(("selection_images",), "is for --split test: with --split val, the heuristic that learned rows are "
                                      "compared with is chosen on the evaluated images")
    elif args.heuristics_only and not args.cascade:
        refuse(("selection_images",), "chooses the heuristic that learned rows and --cascade are compared with: "
                                      "--heuristics-only without --cascade has none")
    if args.no_speed:
        refuse(("speed_repeats", "speed_batch_sizes", "compile"), "is for the timing columns, which --no-speed skips")


def run(args: argparse.Namespace, given: Collection[str]) -> int:
    """Check everything that can fail cheaply, then evaluate, print and write; nothing written on error. ``given``:
    the flags the command line named (:func:`cli.given_flags`)."""
    check_flags(args, given)
    device = resolve_device(args.device)
    problem, policies = policies_to_evaluate(args)
    check_results_directory(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoints = {path: (modules, info) for modules, info, path in policies.values()}  # one may serve budgets
    staged, backbone_config, backbone_path = backbone_to_evaluate(args, problem, checkpoints)
    cascade = plan_cascade(args, problem, staged, policies)
    compared = bool(policies or cascade)  # rows compared with the best heuristic at their budget
    splits = evaluation_splits(args, problem, backbone_config, backbone_path, checkpoints, compared=compared,
                               calibrated=cascade is not None)
    methods = plan_methods(args.budgets, {b: (m, info.problem) for b, (m, info, _) in policies.items()}, cascade)
    reduction = args.reduction or problem.reduction
    evaluation = evaluate_methods(staged, backbone_config, splits.evaluated, methods, reduction,
                                  batch_size=args.batch_size, seed=args.seed,
                                  speed_repeats=None if args.no_speed else args.speed_repeats,
                                  speed_batch_sizes=args.speed_batch_sizes, device=device, dtype=DTYPES[args.dtype],
                                  calibration=splits.calibration, selection=splits.selection,
                                  compile_speed=args.compile)
    warn_of_dear_cascades(evaluation.table, evaluation.methods)
    settings = results_settings(args, policies, backbone_path, staged.prune_points, reduction, device, cascade,
                                splits, evaluation, compared=compared)
    print(f"{header_line(settings)}\n\n{markdown_table(evaluation.table)}")
    paths = write_results(evaluation.table, args.output_dir, settings, evaluation.predictions)
    print("\nwrote " + ", ".join(str(path) for path in paths))
    return 0


def policies_to_evaluate(args: argparse.Namespace) -> tuple[PruningProblem, dict[float, LoadedPolicy]]:
    """The problem the rows are evaluated on and the checkpoints by the budget each is evaluated at: none with
    ``--heuristics-only`` (:func:`heuristics_problem`); else ``--checkpoint``'s problem, with it at its own
    target ratio and at those of ``--budgets`` it was trained at (``train.py --train-ratios``), and
    ``--checkpoints-per-budget`` at theirs (:func:`load_policies_by_budget`)."""
    if args.heuristics_only:
        return heuristics_problem(args), {}
    if args.checkpoint == DEFAULT_CHECKPOINT and not DEFAULT_CHECKPOINT.exists():
        if installed_without_repository():
            raise EvaluationError(f"no policy checkpoint at {DEFAULT_CHECKPOINT}, the default: {NOT_A_CLONE}")
        raise EvaluationError(f"no policy checkpoint at {DEFAULT_CHECKPOINT} (the default; train one with "
                              "train.py and pass --checkpoint PATH)")
    policies = load_policies_by_budget(args.checkpoint, args.checkpoints_per_budget,
                                       same_backbone=not args.backbone, same_reduction=not args.reduction)
    problem = next(iter(policies.values()))[1].problem
    for budget in set(args.budgets) & {budget_key(ratio) for ratio in problem.train_ratios} - set(policies):
        policies[budget] = policies[budget_key(problem.target_ratio)]
    return problem, policies


def heuristics_problem(args: argparse.Namespace) -> PruningProblem:
    """What a ``--heuristics-only`` run evaluates, in place of a checkpoint's problem: ``--backbone`` (default: the
    reference) on its data set and the validation split it held out, pruned at ``--prune-points`` with
    ``--reduction`` (default: merge); its budget (the cascade's) is the middle one of ``--budgets`` (of an even
    number, the upper of the two middle ones)."""
    backbone = Path(args.backbone).expanduser() if args.backbone else REFERENCE_BACKBONE
    if holds_policies(backbone):
        raise EvaluationError(f"--backbone {backbone} is a policy checkpoint: evaluate it with --checkpoint {backbone} "
                              f"(without --heuristics-only)")
    given = {"dataset": args.dataset, "prune_points": args.prune_points,
             "reduction": args.reduction}  # the others: the problem's defaults
    problem = PruningProblem(backbone=repository_relative(backbone), target_ratio=args.budgets[len(args.budgets) // 2],
                             **{name: value for name, value in given.items() if value is not None})
    return problem.on_backbone_data(["dataset"] if args.dataset else [])


LoadedPolicy = tuple[dict[str, TokenScoring], CheckpointInfo, Path]
"""A checkpoint's policy modules (by policy name), what its ``pruning_config.json`` says, and its path."""


def load_policies_by_budget(main: Path, extras: Mapping[float, Path], *, same_backbone: bool = True,
                            same_reduction: bool = True) -> dict[float, LoadedPolicy]:
    """The checkpoint ``main`` at its own target ratio and each of ``extras`` at the budget it is given for,
    as ``{budget: (modules, info, path)}``, ``main`` first.

    Results are only comparable on one backbone, pruning schedule and reduction: every extra checkpoint must
    share the main one's pruning points and, where ``same_backbone`` / ``same_reduction``, its backbone and
    reduction.
    """
    modules, info = load_policies(main)
    policies = {budget_key(info.problem.target_ratio): (modules, info, Path(main))}
    problem = info.problem
    for budget, path in extras.items():
        if budget in policies:
            raise PolicyCheckpointError(f"budget {budget:g} is the main checkpoint's own target_ratio")
        extra_modules, extra = load_policies(path)
        other = extra.problem
        if other.prune_points != problem.prune_points:
            raise PolicyCheckpointError(f"checkpoint {path} prunes at {list(other.prune_points)}, the main one at "
                                        f"{list(problem.prune_points)}")
        if same_reduction and other.reduction != problem.reduction:
            raise PolicyCheckpointError(f"checkpoint {path} was trained to {other.reduction} tokens, the main one "
                                        f"to {problem.reduction} (pass --reduction to force one)")
        if same_backbone and other.backbone_path != problem.backbone_path:
            raise PolicyCheckpointError(f"checkpoint {path} was trained on backbone {other.backbone_path}, the main "
                                        f"one on {problem.backbone_path} (pass --backbone to force one)")
        if budget not in {budget_key(ratio) for ratio in other.ratios_trained}:
            trained = ", ".join(f"{ratio:g}" for ratio in other.ratios_trained)
            print(f"note: checkpoint {path} was trained at removal ratio {trained}; evaluating it at {budget:g}",
                  file=sys.stderr)
        policies[budget] = (extra_modules, extra, Path(path))
    return policies


def check_results_directory(args: argparse.Namespace) -> None:
    """An error for an ``--output-dir`` that cannot take the results, before anything is evaluated: one that is a
    checkpoint, or that holds an earlier run's results without ``--overwrite``."""
    output_dir = args.output_dir
    check_output_dir(output_dir, str(output_dir))
    if holds_policies(output_dir) or is_backbone_checkpoint(output_dir):
        raise EvaluationError(f"--output-dir {output_dir} is a checkpoint (a policy's or a backbone's): give the "
                              f"results a directory of their own")
    written = [output_dir / name for name in RESULT_FILES if (output_dir / name).exists()]
    if written and not args.overwrite:
        raise EvaluationError(f"{written[0]} exists; pass --overwrite to replace it")


def backbone_to_evaluate(args: argparse.Namespace, problem: PruningProblem,
                         checkpoints: Mapping[Path, tuple[Modules, CheckpointInfo]]
                         ) -> tuple[StagedViT, dict[str, Any], Path]:
    """The backbone the rows run on, its config and path (``policies.pruned_vit.checked_backbone``). Where the
    default ``--checkpoint`` does not fit it, the error says the reference policy needs the reference backbone."""
    try:
        return checked_backbone(problem, checkpoints, args.backbone)
    except PrunePointsError as error:  # --heuristics-only: the problem prunes at --prune-points (or its default)
        raise EvaluationError(f"--prune-points {spelled_points(problem.prune_points)}: {error}") from None
    except PolicyCheckpointError as error:
        if args.checkpoint != DEFAULT_CHECKPOINT or args.heuristics_only:
            raise
        raise EvaluationError(f"{error} (the default --checkpoint is the reference policy, trained on the reference "
                              f"backbone: train one on yours with train.py --backbone and pass --checkpoint)") from None


def plan_cascade(args: argparse.Namespace, problem: PruningProblem, staged: StagedViT,
                 policies: Mapping[float, LoadedPolicy]) -> tuple[float, CascadePasses] | None:
    """The budget and the passes of the cascade rows (:func:`plan_methods`), None without ``--cascade``; a note
    where the checkpoint at that budget has two agents that prune elsewhere, so that its cascade row is missing."""
    if not args.cascade:
        return None
    cascade_points = args.cascade_points or CASCADE_PRUNE_POINTS
    try:
        StagedViT(staged.vit, cascade_points)
    except UsageError as error:
        raise EvaluationError(f"--cascade-points {spelled_points(cascade_points)}: {error}") from None
    budget = budget_key(problem.target_ratio)
    _, info, path = policies.get(budget, (None, None, None))
    if info is not None and info.problem.agents == "both" and info.problem.prune_points != cascade_points:
        points = spelled_points(info.problem.prune_points)
        print(f"note: no {CASCADE['policy']} row: the agents of {path} prune at {points}, the cascade at "
              f"{spelled_points(cascade_points)} (--cascade-points {points} runs them in it)", file=sys.stderr)
    return budget, CascadePasses(cascade_points, args.cascade)


@dataclass(frozen=True)
class EvaluationSplits:
    """The images a run reads (:func:`evaluation_splits`)."""

    dataset: str
    evaluated: ImageSplit
    """``--split``, the images the table is measured on."""
    calibration: ImageSplit | None
    """Validation images the cascade rows are calibrated on (None without a cascade)."""
    selection: ImageSplit | None
    """Validation images the best heuristic of each budget is chosen on (None: the evaluated images, or no row is
    compared with one)."""
    ranked: dict[str, int]
    """Per checkpoint, how many of the evaluated images ranked its run's checkpoints (:func:`ranked_images_evaluated`;
    none but on ``--split val``)."""


def evaluation_splits(args: argparse.Namespace, problem: PruningProblem, backbone_config: Mapping[str, Any],
                      backbone_path: Path, checkpoints: Mapping[Path, tuple[Modules, CheckpointInfo]], *,
                      compared: bool, calibrated: bool) -> EvaluationSplits:
    """The images to evaluate on and, held out from them on ``--split test``, those the best heuristic is chosen on
    where rows are ``compared`` with it and those a cascade is ``calibrated`` on; a note for each checkpoint whose
    run was ranked on some of the evaluated validation images. Errors name what to pass instead, and the validation
    split is checked before the test images are decoded."""
    dataset = args.dataset or problem.dataset

    def images(split_name: str, limit: int | None) -> ImageSplit:
        return load_checked_split(dataset, split_name, args.data_dir, backbone_config, val_size=problem.val_size,
                                  seed=problem.split_seed, limit=limit, **data_access(args))

    if args.split == "test" and compared:  # checked before the test images are decoded
        try:
            check_held_out("val", dataset, problem.val_size, problem.split_seed, backbone_config)
        except DataError as error:
            raise EvaluationError(f"{CHOSEN_ON_VALIDATION}: {error}") from None
    try:
        split = images(args.split, args.limit)
    except ClassesDiffer as error:
        default = args.heuristics_only and not args.backbone  # the reference backbone, for CIFAR-10
        raise DataError(f"{error}: the backbone is {backbone_path}"
                        + (" (the reference; pass yours with --backbone)" if default else "")) from None
    except DataError as error:
        recorded = Path(problem.data_dir).expanduser()
        if Path(args.data_dir).expanduser().exists() or not recorded.exists():
            raise
        raise DataError(f"{error} (the checkpoint was trained on the data in {recorded}: pass --data-dir "
                        f"{recorded})") from None
    if len(split) < 2:
        raise EvaluationError(f"{len(split)} image to evaluate: the paired intervals need at least 2")
    problems = {path: info.problem for path, (_, info) in checkpoints.items()}
    ranked = (ranked_images_evaluated(problems, problem.val_size, problem.split_seed, args.limit)
              if args.split == "val" else {})
    for path, count in ranked.items():
        if count:
            print(f"note: {count} of the {len(split)} validation images evaluated ranked the checkpoints of {path}'s "
                  f"run (train.py's --val-limit): its rows read high on them", file=sys.stderr)
    calibration = images("val", args.calibration_images) if calibrated else None
    try:
        selection = images("val", args.selection_images) if args.split == "test" and compared else None
    except DataError as error:
        raise EvaluationError(f"{CHOSEN_ON_VALIDATION}: {error}") from None
    return EvaluationSplits(dataset, split, calibration, selection, ranked)


def ranked_images_evaluated(checkpoints: Mapping[Path, PruningProblem], val_size: int, seed: int,
                            limit: int | None) -> dict[str, int]:
    """For each checkpoint evaluated on validation images (``limit`` of the ``val_size``, load_split's subset), how
    many of them train.py ranked that run's checkpoints on (its ``val_limit`` subset): the best checkpoint reads
    high on the very images that chose it."""
    evaluated = limited_positions(val_size, limit or val_size, seed)
    return {repository_relative(path): len(np.intersect1d(evaluated,
                                                          limited_positions(val_size, problem.val_limit, seed)))
            for path, problem in checkpoints.items()}


def results_settings(args: argparse.Namespace, policies: Mapping[float, LoadedPolicy], backbone_path: Path,
                     prune_points: Sequence[int], reduction: str, device: torch.device,
                     cascade: tuple[float, CascadePasses] | None, splits: EvaluationSplits, evaluation: Evaluation, *,
                     compared: bool) -> dict[str, Any]:
    """What results.json records beside the table (and the header line above it says): what was evaluated, on
    which images, how, and with which code, so that a table can be told from another and reproduced."""
    split, calibration, selection = splits.evaluated, splits.calibration, splits.selection
    return {"checkpoints": {f"{b:g}": repository_relative(path) for b, (_, _, path) in policies.items()},
            "iterations": {f"{b:g}": info.iteration for b, (_, info, _) in policies.items()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": code_commit(),
            "backbone": repository_relative(backbone_path), "dataset": splits.dataset,
            "split": args.split, "images": len(split), "limit": args.limit,
            "class_names": list(split.class_names),  # the order of predictions.csv.gz's class numbers
            "prune_points": list(prune_points), "reduction": reduction,
            "budgets": sorted(set(args.budgets) | set(policies)), "seed": args.seed, "batch_size": args.batch_size,
            "device": describe_device(device), "dtype": args.dtype,
            "speed_repeats": None if args.no_speed else args.speed_repeats,
            "compiled": None if args.no_speed else args.compile,
            "speed_batch_sizes": list(args.speed_batch_sizes),
            "speed_images": None if args.no_speed else speed_note(len(split), args.speed_batch_sizes),
            "speed_rounds": evaluation.speed_rounds,
            "cascade": None if cascade is None else {"prune_points": list(cascade[1].prune_points),
                                                     "ratios": list(args.cascade),
                                                     "calibration_images": len(calibration)},
            "checkpoint_ranking_images_evaluated": splits.ranked or None,
            "best_heuristic_chosen_on": (None if not compared else f"{len(selection)} validation images"
                                         if selection is not None else "the evaluated images"),
            "torch_threads": torch.get_num_threads(), "versions": versions_line(),
            "arguments": {name: as_json(value) for name, value in sorted(vars(args).items())}}


def as_json(value: Any) -> Any:
    """An argument's value as results.json records it: numbers, strings, booleans and None as they are, sequences
    as lists, mappings as objects (a budget key as the ``checkpoints`` setting writes it, ``0.3``), anything else (a
    path) as its string."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    if isinstance(value, Mapping):
        return {f"{key:g}" if isinstance(key, float) else str(key): as_json(item) for key, item in value.items()}
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 2 with one ``error: ...`` line on stderr for bad input, 130 on
    Ctrl-C (the results are written at the end only, so nothing is)."""
    return run_command_line(build_parser, argv, run,
                            lambda args, given: "interrupted: nothing was written; run the command again")


if __name__ == "__main__":
    sys.exit(main())
