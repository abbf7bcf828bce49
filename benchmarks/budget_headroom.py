"""Per-image budgets: how much room they leave, and whether what a policy sees at a pruning point finds it.

    python -m benchmarks.budget_headroom --data-dir ../shared/data      # about 9 minutes on a 2-core CPU
    python -m benchmarks.budget_headroom --data-dir ../shared/data --prune-points 1,3,5,7,9,11 \\
        --levels 0.1,0.2,0.3,0.4,0.5                                   # six points at r = 0.5's cost

The learning issue's target 2 asks for a mode whose *mean* GFLOPs per image equal the exact budget's and whose
accuracy is 1.2 points above greedy similarity's. This measures whether a budget chosen per image can get there
before one is learned. The exact budget is the checkpoint's (``--budget`` replaces its ratio); at other
``--prune-points`` it is the ratio of the same greedy-similarity GFLOPs. For each decision point (a pruning
point), every image runs the pruning points before it at the exact budget; from it on, the image takes one of
``--levels`` removal ratios. Greedy similarity chooses the tokens throughout, so only how many tokens each
image keeps changes. On validation images (never the test split) it reports:

- per level: GFLOPs, accuracy and agreement with the unpruned model, and the AUC with which a logistic
  regression predicts "this level keeps the unpruned answer" from what a policy could observe at the decision
  point: the logit lens (the classifier head on the tokens there) and the class token. The regression is fitted
  on ``--train-images`` train images.
- oracle: each image at the cheapest level that keeps the unpruned answer (the dearest if none does). This is
  what a perfect budget policy reaches, and at what mean cost; it needs no labels, only the unpruned answer.
- predicted: images ranked by the regression of a cheap level; the top share takes it, the rest a dear level,
  in the share that keeps the mean GFLOPs at most the exact budget's. The pair of levels is the one whose
  allocation keeps the unpruned answer most often on the train images (by cross-validated predictions).
  Compared with the exact budget on the same images (paired bootstrap 95% interval).

Measured (reference backbone, r = 0.5, 4,000 train and 2,000 validation images, this 2-core CPU): see
benchmarks/README.md.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks import (
    add_data_and_checkpoint_arguments,
    benchmark_parser,
    checkpoint_backbone,
    fitted_on,
    run_from_command_line,
)
from benchmarks.schedule_headroom import matched_ratio
from benchmarks.split_states import first_stage_states
from cli import positive_int
from envs.problem import block_indices, removal_ratio, removal_ratios
from envs.vit.flops import ViTSpec, exact_budget_schedule, image_gflops
from envs.vit.pruned_forward import TokenState, classify, prune_step
from envs.vit.staged_vit import StagedViT
from evaluation.compare import paired_difference
from policies.heuristics import heuristic_selector

SELECT = heuristic_selector("similarity")


def schedule(num_patches: int, num_points: int, decision: int, target_ratio: float, level: float) -> list[int]:
    """Live patch tokens per stage: ``target_ratio`` at the pruning points before ``decision``, ``level`` from it
    on."""
    before = exact_budget_schedule(num_patches, decision, target_ratio)
    return before + exact_budget_schedule(before[-1], num_points - decision, level)[1:]


def output_features(logits: torch.Tensor) -> torch.Tensor:
    """``[B, C + 3]``: what the logits ``[B, C]`` of a classifier say of how sure it is: the log-probabilities,
    their entropy and the two largest probabilities."""
    log_probs = logits.float().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1, keepdim=True)
    return torch.cat([log_probs, entropy, log_probs.exp().topk(2, dim=-1).values], dim=-1)


def logit_lens(staged: StagedViT, state: TokenState, reduction: str) -> torch.Tensor:
    """``[B, C + 3]``: the logit lens at the state's pruning point, the :func:`output_features` of the classifier
    head on the tokens there."""
    return output_features(classify(staged, state, reduction))


def observation(staged: StagedViT, state: TokenState, reduction: str) -> torch.Tensor:
    """``[B, F]``: the :func:`logit_lens` at the state's pruning point and the class token (the first token)."""
    return torch.cat([logit_lens(staged, state, reduction), state.tokens[:, 0]], dim=-1)


def run_levels(staged: StagedViT, states: list[TokenState], unpruned: torch.Tensor, labels: torch.Tensor,
               decision: int, schedules: list[list[int]], reduction: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the images of ``states`` (batches at the first pruning point, ``first_stage_states``; ``unpruned``
    their log-probabilities, ``labels`` theirs): the observation at ``decision`` ``[n, F]``, per level (its
    :func:`schedule` in ``schedules``, which agree up to ``decision``) whether the prediction agrees with the
    unpruned model ``[n, L]`` and with the label ``[n, L]``, and whether the unpruned model's does ``[n]``."""

    def prune(state: TokenState, kept: list[int], points: range) -> TokenState:
        for point in points:
            state = prune_step(staged, state, SELECT(state, kept[point + 1]), reduction)
        return state

    observed, predictions = [], []
    for state in states:
        state = prune(state, schedules[0], range(decision))
        observed.append(observation(staged, state, reduction))
        predictions.append(torch.stack([classify(staged, prune(state, kept, range(decision, len(staged.prune_points))),
                                                 reduction).argmax(1) for kept in schedules], dim=1))
    predictions, unpruned = torch.cat(predictions), unpruned.argmax(1)
    return tuple(t.numpy() for t in (torch.cat(observed), predictions == unpruned[:, None],
                                     predictions == labels[:, None], unpruned == labels))


def allocation(scores: np.ndarray, cheap: int, dear: int, costs: np.ndarray, budget: float) -> np.ndarray:
    """Level per image: the highest ``scores`` take level ``cheap``, the others ``dear``, as many as keeps the
    mean cost at most ``budget``."""
    share = (costs[dear] - budget) / (costs[dear] - costs[cheap])
    levels = np.full(len(scores), dear)
    levels[np.argsort(-scores)[:int(np.ceil(share * len(scores)))]] = cheap
    return levels


def fitted_allocation(models: dict[int, Pipeline], train_x: np.ndarray, train_agree: np.ndarray, val_x: np.ndarray,
                      costs: np.ndarray, exact: int) -> tuple[int, int, np.ndarray] | None:
    """The fitted budget policy's levels for the validation images ``val_x``, at most the exact level's mean cost:
    of the pairs of a cheaper level (one with a fitted regression in ``models``) and a dearer one, the pair whose
    :func:`allocation` by cross-validated predictions keeps the unpruned answer on most train images. Returns the
    pair and the levels, or None when no pair brackets the exact level."""
    pairs = [(cheap, dear) for cheap in models for dear in range(len(costs))
             if costs[cheap] < costs[exact] < costs[dear]]
    if not pairs:
        return None
    train_scores = {cheap: cross_val_predict(models[cheap], train_x, train_agree[:, cheap], cv=5,
                                             method="predict_proba")[:, 1] for cheap in {cheap for cheap, _ in pairs}}
    train_agreement = {(cheap, dear): train_agree[np.arange(len(train_x)), allocation(
        train_scores[cheap], cheap, dear, costs, costs[exact])].mean() for cheap, dear in pairs}
    cheap, dear = max(pairs, key=train_agreement.get)
    return cheap, dear, allocation(models[cheap].predict_proba(val_x)[:, 1], cheap, dear, costs, costs[exact])


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone, target ratio and reduction")
    parser.add_argument("--levels", type=removal_ratios, default="0.1,0.2,0.35,0.5,0.65,0.8",
                        help="removal ratios an image may take from the decision point on (default: %(default)s)")
    parser.add_argument("--prune-points", type=block_indices, default=None,
                        help="blocks before which to prune (default: the checkpoint's)")
    parser.add_argument("--budget", type=removal_ratio, default=None,
                        help="removal ratio at the checkpoint's pruning points that sets the exact budget's cost; "
                             "other --prune-points remove the ratio of the same greedy-similarity GFLOPs (default: "
                             "the checkpoint's target ratio)")
    parser.add_argument("--train-images", type=positive_int, default=4000, help="train images the method is fitted on")
    parser.add_argument("--val-images", type=positive_int, default=2000,
                        help="validation images it is scored on (never the test split)")
    args = parser.parse_args(argv)

    problem, checkpoint_staged, config = checkpoint_backbone(args.checkpoint)
    spec, prune_points = ViTSpec.from_model(checkpoint_staged.vit), args.prune_points or problem.prune_points
    staged = StagedViT(checkpoint_staged.vit, prune_points).eval()
    exact_ratio = matched_ratio(spec, problem.prune_points, prune_points, args.budget or problem.target_ratio,
                                problem.reduction)
    levels = sorted({*args.levels, exact_ratio})
    exact = levels.index(exact_ratio)
    points = len(prune_points)
    splits = {split: first_stage_states(staged, config, problem, args.data_dir, split, limit, batch_size=250)
              for split, limit in (("train", args.train_images), ("val", args.val_images))}

    for decision in range(points):
        schedules = [schedule(staged.num_patches, points, decision, exact_ratio, level) for level in levels]
        costs = np.array([image_gflops(spec, staged.prune_points, kept, problem.reduction, "similarity").total
                          for kept in schedules])
        with torch.no_grad():
            train_x, train_agree, _, _ = run_levels(staged, *splits["train"], decision, schedules, problem.reduction)
            val_x, val_agree, val_correct, unpruned_correct = run_levels(staged, *splits["val"], decision, schedules,
                                                                         problem.reduction)
        models = {level: make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
                  for level in range(len(levels)) if 0 < train_agree[:, level].mean() < 1}
        with fitted_on(len(train_x)):
            for level, model in models.items():
                model.fit(train_x, train_agree[:, level])
        block = staged.prune_points[decision]
        print(f"[decision at pruning point {decision + 1}, before block {block}] {len(val_correct)} validation "
              f"images; the exact budget r = {exact_ratio} at pruning points {prune_points}: {costs[exact]:.4f} "
              f"GFLOPs; the unpruned model: {100 * unpruned_correct.mean():.2f}%")
        print(f"{'level':>6} {'kept per stage':>16} {'GFLOPs':>7} {'acc %':>6} {'agree %':>8} {'AUC':>6}")
        for level, kept in enumerate(schedules):
            auc = (f"{roc_auc_score(val_agree[:, level], models[level].predict_proba(val_x)[:, 1]):6.3f}"
                   if level in models and 0 < val_agree[:, level].mean() < 1 else f"{'-':>6}")
            print(f"{levels[level]:6.3f} {','.join(map(str, kept)):>16} {costs[level]:7.4f} "
                  f"{100 * val_correct[:, level].mean():6.2f} {100 * val_agree[:, level].mean():8.2f} {auc}")

        rows = np.arange(len(val_correct))
        cheapest = np.where(val_agree.any(1), np.where(val_agree, costs, np.inf).argmin(1), costs.argmax())
        report = {"oracle (cheapest level that keeps the answer)": cheapest}
        with fitted_on(len(train_x)):
            fitted = fitted_allocation(models, train_x, train_agree, val_x, costs, exact)
        if fitted is not None:
            cheap, dear, chosen = fitted
            report[f"predicted (levels {levels[cheap]:g} / {levels[dear]:g}, chosen on train)"] = chosen
        for name, chosen in report.items():
            difference, low, high = paired_difference(val_correct[rows, chosen], val_correct[:, exact])
            print(f"  {name}: mean GFLOPs {costs[chosen].mean():.4f}, acc {100 * val_correct[rows, chosen].mean():.2f}%"
                  f", agree {100 * val_agree[rows, chosen].mean():.2f}%, vs the exact budget {difference:+.2f} "
                  f"[{low:+.2f}, {high:+.2f}]", flush=True)


if __name__ == "__main__":
    run_from_command_line(main)
