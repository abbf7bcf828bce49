"""Per-image budgets by a confidence cascade: prune hard, and run again less pruned where the answer is unsure.

    python -m benchmarks.cascade_headroom --data-dir ../shared/data      # about 8 minutes on a 2-core CPU

The learning issue's target 2 asks for a mode whose *mean* GFLOPs per image are at most greedy similarity's at
r = 0.5 and whose accuracy is 1.2 points above it. ``budget_headroom.py`` found that a level chosen per image at
a pruning point, from what is seen there, does not pay. This tries the other classic way to spend a budget per
image: a cascade. Every image runs a cheap pruned forward; the share whose top-two class probabilities are
closest (the least sure answers) runs a second forward from the start (any of the passes; the pairs that pay
pick a dearer one), whose answer replaces the first. The share is as large as keeps the mean GFLOPs at most
the budget's, with the second forward counted whole (a deployment would reuse the first stage; this does not
count that saving).

Each pass is greedy similarity at one of ``--ratios`` on the checkpoint's pruning points (which set the budget:
greedy similarity removing ``--budget`` there) or on those of ``--schedules``, or the unpruned model.
The pair of passes is chosen on ``--train-images`` train images, by agreement with the unpruned model (no
labels). The chosen pair, and the best few by that train agreement, are then run on ``--val-images``
validation images (never the test split) and compared with greedy similarity at the budget on the same images
(paired bootstrap 95% interval). The chosen pair also runs with three other rules for which images rerun: two
learned on the train images, a logistic regression on the first forward's output (its log-probabilities,
their entropy and its two largest probabilities) and one that also sees the same of the logit lens at each
of its pruning points (the classifier head on the tokens there: how the answer formed through the forward);
and an oracle that knows where a rerun keeps the unpruned answer (an upper bound, not a method).

Measured (reference backbone, r = 0.5, 4,000 train and 2,000 validation images, this 2-core CPU): see
benchmarks/README.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks import (
    add_data_and_checkpoint_arguments,
    benchmark_parser,
    checkpoint_backbone,
    fitted_on,
    run_from_command_line,
)
from benchmarks.budget_headroom import logit_lens, output_features
from benchmarks.split_states import first_stage_states
from cli import positive_int
from envs.problem import PruningProblem, block_indices, removal_ratio, removal_ratios
from envs.vit.flops import ViTSpec, exact_budget_gflops, unpruned_gflops
from envs.vit.pruned_forward import Selector, TokenState, exact_forward_from
from envs.vit.scoring import percent_equal
from envs.vit.staged_vit import StagedViT
from evaluate import CASCADE_PRUNE_POINTS
from evaluation.compare import paired_difference
from policies.cascade import doubt, rerun_share
from policies.heuristics import heuristic_selector

SELECT = heuristic_selector("similarity")
UNPRUNED = "unpruned"


class Pass(NamedTuple):
    """One forward of every image: its log-probabilities ``[n, C]``, its GFLOPs per image and, for a pruned
    forward, its trajectory ``[n, S, C + 3]``: the ``logit_lens`` at each of its ``S`` pruning points."""

    log_probs: torch.Tensor
    gflops: float
    trajectory: torch.Tensor | None = None

    @property
    def predictions(self) -> torch.Tensor:
        """``[n]``: the predicted classes."""
        return self.log_probs.argmax(-1)

    @property
    def doubt(self) -> torch.Tensor:
        """``[n]``: how unsure each answer is, the margin rule's score (``policies.cascade.doubt``)."""
        return doubt(self.log_probs)


def as_pass(logits: torch.Tensor, gflops: float, trajectory: torch.Tensor | None = None) -> Pass:
    """The pass whose logits ``[n, C]`` (and ``trajectory``, :class:`Pass`) these are, at ``gflops`` per image."""
    return Pass(logits.float().log_softmax(-1), gflops, trajectory)


def cascade(first: Pass, second: Pass, budget: float, scores: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade's predictions ``[n]``: ``first``'s, replaced by ``second``'s on the images of the highest
    ``scores`` ``[n]`` (by default ``first.doubt``, the margin rule), as many as keep the mean GFLOPs (``first`` on
    every image, ``second`` on those) at most ``budget``; and which images ran ``second`` ``[n]`` (bool)."""
    scores = first.doubt if scores is None else scores
    share = rerun_share(first.gflops, second.gflops, budget)
    rerun = torch.zeros(len(scores), dtype=torch.bool)
    rerun[scores.argsort(descending=True)[:int(share * len(scores))]] = True
    return torch.where(rerun, second.predictions, first.predictions), rerun


def rerun_gain(first: Pass, second: Pass, unpruned: Pass) -> torch.Tensor:
    """``[n]``: 1 where the second forward keeps the unpruned answer and the first does not, -1 the reverse, 0
    where both or neither do."""
    return (second.predictions == unpruned.predictions).float() - (first.predictions == unpruned.predictions).float()


def rule_inputs(first: Pass, with_trajectory: bool) -> torch.Tensor:
    """``[n, F]``: what a learned rerun rule sees of the first forward: its output's ``output_features``, and with
    ``with_trajectory`` its trajectory's as well."""
    inputs = output_features(first.log_probs)
    return torch.cat([inputs, first.trajectory.flatten(1)], dim=1) if with_trajectory else inputs


def fitted_doubt(train: tuple[Pass, Pass, Pass], first: Pass, with_trajectory: bool = False) -> torch.Tensor:
    """A learned rerun rule: a logistic regression on :func:`rule_inputs`, fitted on the ``train`` passes (first,
    second, unpruned) to predict that a rerun gains (:func:`rerun_gain`); its probability on ``first``."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    inputs = rule_inputs(train[0], with_trajectory).numpy()
    with fitted_on(len(inputs)):
        model.fit(inputs, (rerun_gain(*train) > 0).numpy())
    return torch.from_numpy(model.predict_proba(rule_inputs(first, with_trajectory).numpy())[:, 1])


def lens_recording(staged: StagedViT, reduction: str, lens: list[torch.Tensor]) -> Selector:
    """Greedy similarity's selector, appending to ``lens`` at each pruning point the ``logit_lens`` there,
    ``[B, C + 3]``."""

    def select(state: TokenState, k: int) -> torch.Tensor:
        lens.append(logit_lens(staged, state, reduction))
        return SELECT(state, k)

    return select


def pass_name(points: tuple[int, ...], ratio: float) -> str:
    """The name of greedy similarity's pass removing ``ratio`` at pruning points ``points``: ``1,3,5 at 0.35``."""
    return f"{','.join(map(str, points))} at {ratio:g}"


def cascade_pairs(passes: dict[str, Pass], budget: float) -> list[tuple[str, str]]:
    """The (first, second) pairs whose cascade spends the budget: the first pass cheaper than it, the two
    together dearer (so some images run the second)."""
    return [(first, second) for first in passes for second in passes
            if passes[first].gflops < budget < passes[first].gflops + passes[second].gflops]


@torch.no_grad()
def run_passes(staged: StagedViT, schedules: list[tuple[int, ...]], ratios: tuple[float, ...], config: dict,
               problem: PruningProblem, data_dir: str, split: str, limit: int) -> tuple[dict[str, Pass], torch.Tensor]:
    """Every pass (each schedule at each ratio, and the unpruned model) on ``limit`` images of ``split``, and the
    images' labels."""
    spec, passes = ViTSpec.from_model(staged.vit), {}
    for points in schedules:
        stages = StagedViT(staged.vit, points).eval()
        states, unpruned, labels = first_stage_states(stages, config, problem, data_dir, split, limit, batch_size=250)
        for ratio in ratios:
            logits, trajectories = [], []
            for state in states:
                lens: list[torch.Tensor] = []
                logits.append(exact_forward_from(stages, state, lens_recording(stages, problem.reduction, lens), ratio,
                                                 problem.reduction))
                trajectories.append(torch.stack(lens, dim=1))
            gflops = exact_budget_gflops(spec, points, ratio, problem.reduction, "similarity").total
            passes[pass_name(points, ratio)] = as_pass(torch.cat(logits), gflops, torch.cat(trajectories))
    passes[UNPRUNED] = as_pass(unpruned, unpruned_gflops(spec))
    return passes, labels


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone, data split, reduction and pruning points")
    parser.add_argument("--budget", type=removal_ratio, default=None,
                        help="removal ratio at the checkpoint's pruning points that sets the mean GFLOPs "
                             "(default: the checkpoint's target ratio)")
    parser.add_argument("--schedules", type=block_indices, nargs="+", default=[CASCADE_PRUNE_POINTS],
                        help="pruning points of the passes besides the checkpoint's (default: "
                             f"{','.join(map(str, CASCADE_PRUNE_POINTS))})")
    parser.add_argument("--ratios", type=removal_ratios, default="0.1,0.2,0.3,0.35,0.4,0.5,0.6,0.7",
                        help="removal ratios of the passes, at every schedule (default: %(default)s)")
    parser.add_argument("--train-images", type=positive_int, default=4000,
                        help="train images the pair of passes is chosen on")
    parser.add_argument("--val-images", type=positive_int, default=2000,
                        help="validation images it is scored on (never the test split)")
    parser.add_argument("--show", type=positive_int, default=5, help="pairs to show on validation")
    args = parser.parse_args(argv)

    problem, staged, config = checkpoint_backbone(args.checkpoint)
    budget_ratio = args.budget or problem.target_ratio
    budget = exact_budget_gflops(ViTSpec.from_model(staged.vit), staged.prune_points, budget_ratio,
                                 problem.reduction, "similarity").total
    schedules = [staged.prune_points, *(points for points in args.schedules if points != staged.prune_points)]
    ratios = tuple(sorted({*args.ratios, budget_ratio}))
    train, _ = run_passes(staged, schedules, ratios, config, problem, args.data_dir, "train", args.train_images)
    val, labels = run_passes(staged, schedules, ratios, config, problem, args.data_dir, "val", args.val_images)

    reference = pass_name(staged.prune_points, budget_ratio)
    pairs = cascade_pairs(train, budget)
    train_agreement = {pair: (cascade(train[pair[0]], train[pair[1]], budget)[0] == train[UNPRUNED].predictions)
                       .float().mean().item() for pair in pairs}
    exact_correct = (val[reference].predictions == labels).numpy().astype(float)
    print(f"{len(labels)} validation images; the budget: greedy similarity removing {budget_ratio:g} at pruning "
          f"points {staged.prune_points}, {budget:.4f} GFLOPs, {100 * exact_correct.mean():.2f}%; the unpruned "
          f"model: {percent_equal(val[UNPRUNED].predictions, labels):.2f}%")
    print("single passes:")
    for name, single in val.items():
        print(f"  {name:>22}: {single.gflops:.4f} GFLOPs, acc "
              f"{percent_equal(single.predictions, labels):.2f}%, agree "
              f"{percent_equal(single.predictions, val[UNPRUNED].predictions):.2f}%")
    ranked = sorted(pairs, key=train_agreement.get, reverse=True)

    def report(name: str, first: str, second: str, scores: torch.Tensor | None = None) -> None:
        predictions, rerun = cascade(val[first], val[second], budget, scores)
        correct = (predictions == labels).numpy().astype(float)
        difference, low, high = paired_difference(correct, exact_correct)
        print(f"  {name} on {100 * rerun.float().mean():.1f}%: val acc {100 * correct.mean():.2f}%, agree "
              f"{percent_equal(predictions, val[UNPRUNED].predictions):.2f}%, vs the budget's greedy "
              f"similarity {difference:+.2f} [{low:+.2f}, {high:+.2f}]", flush=True)

    print(f"cascades by the margin rule, best {args.show} of {len(pairs)} by agreement on the train images:")
    for first, second in ranked[:args.show]:
        report(f"{first} -> {second} (train agree {100 * train_agreement[first, second]:.2f}%)", first, second)
    first, second = ranked[0]
    print(f"the chosen pair, {first} -> {second}, by rerun rule:")
    report("margin", first, second)
    train_pair = (train[first], train[second], train[UNPRUNED])
    report("fitted on train (logistic regression on the first forward's output)", first, second,
           fitted_doubt(train_pair, val[first]))
    report("fitted on train, seeing the logit lens at every pruning point too", first, second,
           fitted_doubt(train_pair, val[first], with_trajectory=True))
    report("oracle (first where the second keeps the unpruned answer and the first does not)", first, second,
           rerun_gain(val[first], val[second], val[UNPRUNED]))


if __name__ == "__main__":
    run_from_command_line(main)
