"""Would the agents choose better tokens if they saw the tokens' content? A policy gradient with content.

    python -m benchmarks.content_headroom --data-dir ../shared/data      # about 10 minutes on a 2-core CPU

The agents score tokens from hand-made features (``envs.vit.features``), and ``feature_headroom`` found no
scoring of those features that beats the warm start on validation. This asks the same of the tokens'
embeddings, outside RLlib, with a plain and unbiased policy gradient and no PPO plumbing in the way.

At every pruning point a scorer gives each live token greedy similarity's keep rank (``0`` for the first
token greedy similarity removes, ``1`` for the last one left) plus a learned correction: a small MLP over the
token's layer-normed embedding, its product with the class token's, and every feature either agent sees
(with ``--relational``, after one self-attention layer over the live tokens). The correction's last layer
starts at zero, so the scorer starts as greedy similarity exactly.

Training draws, at every pruning point, the kept set from the agents' distribution (``ExactCount``: exactly
``k`` tokens, the scores over ``--temperature`` as logits), ``--samples`` episodes per train image. The reward
is the negative KL divergence from the unpruned model's prediction (label-free, like the agents'); each
episode's advantage is its reward minus the mean of the other episodes of the same image (RLOO), and the
update is REINFORCE's. After each epoch it prints the KL of the scorer's most likely sets (the ``k``
highest scores, what evaluation keeps) on train images, next to greedy similarity's before training.

It then scores those most likely sets in the exact pruned forward (``envs.vit.pruned_forward``) on
``--val-images`` validation images (never the test split) against greedy similarity and Distinctive NMS:
accuracy, agreement with the unpruned model, KL, the share of images whose kept tokens differ from greedy
similarity's at some pruning point, and the paired accuracy difference with a bootstrap 95% interval. A gain
here is room that observations with content would give the agents; none means content does not help on this
backbone either, at least not to a policy gradient of this size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks import add_data_and_checkpoint_arguments, benchmark_parser, checkpoint_backbone, run_from_command_line
from benchmarks.learned_vs_warm_start import kept_positions
from benchmarks.split_states import first_stage_states
from cli import positive_float, positive_int, random_seed
from envs.errors import UsageError
from envs.problem import PruningProblem
from envs.pruning_env import leave_one_out_means
from envs.vit.features import ATTENTION_FEATURES, SIMILARITY_FEATURES, observe
from envs.vit.pruned_forward import (
    Selector,
    TokenState,
    concat_states,
    exact_forward_from,
)
from envs.vit.scoring import percent_equal
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest
from evaluation.compare import paired_difference
from policies.distribution import ExactCount
from policies.heuristics import complete_removal_order, heuristic_selector
from policies.token_scorer import DEAD_SCORE


def leave_one_out_draws(text: str) -> int:
    """An argparse ``type`` for ``--samples``: at least 2, as each draw's baseline is the mean of the others'."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (each draw is compared with the others' mean), "
                                         f"got {value}")
    return value


def greedy_keep_rank(x_patch: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: each live token's step in greedy similarity's removal order over ``n`` live tokens,
    ``/ (n - 1)``: 0 for the first removed, 1 for the last left; its top ``k`` are greedy similarity's keep set.
    ``x_patch [B, N, D]``, ``live [B, N]``; 0 on dead tokens."""
    order = complete_removal_order(x_patch, live)
    n_live = live.sum(dim=1, keepdim=True).float()
    order = torch.where(order.isinf(), n_live - 1, order).clamp_min(0)
    return order / (n_live - 1).clamp_min(1)


class ContentScorer(nn.Module):
    """Keep scores ``[B, N]``: greedy similarity's keep rank plus a learned correction, zero at initialisation,
    from each token's content and the agents' features; with ``relational``, one self-attention layer over the
    live tokens lets each token's correction depend on the others' content too."""

    def __init__(self, embed_dim: int, hidden: int, relational: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.embed = nn.Linear(2 * embed_dim + len(ATTENTION_FEATURES) + len(SIMILARITY_FEATURES), hidden)
        self.mix = nn.MultiheadAttention(hidden, num_heads=4, batch_first=True) if relational else None
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_cls: torch.Tensor, x_patch: torch.Tensor, live: torch.Tensor, features: torch.Tensor
                ) -> torch.Tensor:
        """``x_cls [B, D]``, ``x_patch [B, N, D]``, ``live [B, N]``, ``features [B, N, F]`` (both agents')."""
        return greedy_keep_rank(x_patch.detach(), live) + self.correction(x_cls, x_patch, live, features)

    def correction(self, x_cls: torch.Tensor, x_patch: torch.Tensor, live: torch.Tensor, features: torch.Tensor
                   ) -> torch.Tensor:
        """``[B, N]``: the learned part of the scores alone (greedy similarity's keep rank is a sequential
        computation that callers with fixed states compute once)."""
        patch, cls = self.norm(x_patch), self.norm(x_cls).unsqueeze(1)
        hidden = self.embed(torch.cat([patch, patch * cls, features], dim=-1))
        if self.mix is not None:
            hidden = hidden + self.mix(hidden, hidden, hidden, key_padding_mask=~live, need_weights=False)[0]
        return self.out(hidden).squeeze(-1)


def scorer_inputs(staged: StagedViT, state: TokenState, target_ratio: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a :class:`ContentScorer` reads at the pruning point ``state`` waits at: the class token ``[B, D]``,
    the patch tokens ``[B, W, D]``, ``live [B, W]`` and both agents' features ``[B, W, F]``."""
    observation = observe(staged, state, target_ratio)
    features = torch.cat([observation.attention, observation.similarity], dim=-1)
    return state.tokens[:, 0], state.patches, state.live, features


def keep_scores(staged: StagedViT, scorer: ContentScorer, state: TokenState, target_ratio: float) -> torch.Tensor:
    """``scorer``'s keep score of each token of ``state``, ``[B, W]``, from what it reads there."""
    return scorer(*scorer_inputs(staged, state, target_ratio))


def kl_from_unpruned(unpruned: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[B]``: KL(unpruned || pruned) of each image from the unpruned log-probabilities and the pruned logits
    ``[B, C]``: the negative of the reward here, and the measure of fidelity on validation."""
    return (unpruned.exp() * (unpruned - logits.log_softmax(-1))).sum(-1)


def sampled_episodes(staged: StagedViT, scorer: ContentScorer, state: TokenState, target_ratio: float,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the images of ``state`` (at the first pruning point) with sets drawn from the conditional Poisson
    distribution of the scores over ``temperature`` (``ExactCount``, the agents' distribution) at each point.

    Returns the logits ``[B, C]`` (no gradient) and each image's log-probability of the sets it drew, summed
    over the pruning points, ``[B]``, differentiable in the scorer's parameters.
    """
    log_probs = []

    def draw(state: TokenState, k: int) -> torch.Tensor:
        with torch.enable_grad():  # the scores and the sets' log-probabilities; the forward runs without
            scores = keep_scores(staged, scorer, state, target_ratio) / temperature
            count = torch.full((len(scores), 1), float(k))
            distribution = ExactCount(torch.cat([scores.masked_fill(~state.live, DEAD_SCORE), count], dim=1))
            keep = distribution.sample()
            log_probs.append(distribution.logp(keep))
        return keep.bool()

    with torch.no_grad():
        logits = exact_forward_from(staged, state, draw, target_ratio, "merge")
    return logits, torch.stack(log_probs).sum(dim=0)


def scorer_selector(staged: StagedViT, scorer: ContentScorer, target_ratio: float) -> Selector:
    """The learned scorer's most likely sets (its ``k`` highest scores) as an exact-budget ``Selector``."""
    return lambda state, k: highest(keep_scores(staged, scorer, state, target_ratio), k, state.live)


def scorer_problem(checkpoint: Path, benchmark: str) -> tuple[PruningProblem, StagedViT, dict[str, Any]]:
    """The problem of the policy ``checkpoint`` and its backbone staged at its pruning points (and its config),
    a :class:`UsageError` unless it merges and its only prefix token is a class token, which
    :class:`ContentScorer` reads."""
    problem, staged, config = checkpoint_backbone(checkpoint)
    if problem.reduction != "merge" or staged.vit.global_pool != "token" or staged.num_prefix_tokens != 1:
        raise UsageError(f"{benchmark} needs a checkpoint that merges, on a ViT whose only prefix token is a class "
                         f"token; {checkpoint} {'drops' if problem.reduction != 'merge' else 'has another ViT'}")
    return problem, staged, config


def print_validation(staged: StagedViT, config: dict[str, Any], problem: PruningProblem, data_dir: str | Path,
                     limit: int, selections: Mapping[str, Selector]) -> None:
    """Print the validation table: on ``limit`` validation images (a seeded subset, never the test split), the
    exact-budget accuracy, agreement with the unpruned model and KL of each of ``selections`` (name: selector)
    next to greedy similarity's and Distinctive NMS's; the share of images whose kept tokens differ from greedy
    similarity's at some pruning point; and the paired accuracy difference to greedy similarity with its
    bootstrap 95% interval."""
    val_states, val_unpruned, labels = first_stage_states(staged, config, problem, data_dir, "val", limit)
    rows = {"greedy similarity": heuristic_selector("similarity"), "Distinctive NMS": heuristic_selector("distinct"),
            **selections}
    recorders, kept_sets = {}, {}
    for row, row_select in rows.items():
        recorders[row], kept_sets[row] = kept_positions(row_select)
    with torch.no_grad():
        logits = {row: torch.cat([exact_forward_from(staged, state, row_select, problem.target_ratio,
                                                     problem.reduction) for state in val_states])
                  for row, row_select in recorders.items()}
    greedy = next(iter(rows))
    correct = {row: (value.argmax(1) == labels).numpy().astype(float) for row, value in logits.items()}
    print(f"[validation] {len(labels)} images, r = {problem.target_ratio}, {problem.reduction}; unpruned "
          f"{percent_equal(val_unpruned.argmax(1), labels):.2f}%")
    print(f"{'selection':<36} {'acc %':>6} {'agree %':>8} {'KL':>7} {'differs %':>10} {'vs greedy':>10} "
          f"{'95% CI':>16}")
    for row, value in logits.items():
        difference, low, high = paired_difference(correct[row], correct[greedy])
        kl = kl_from_unpruned(val_unpruned, value).mean().item()
        agree = percent_equal(value.argmax(1), val_unpruned.argmax(1))
        differs = torch.stack([(torch.cat(kept_sets[row][point]) != torch.cat(kept_sets[greedy][point])).any(dim=1)
                               for point in range(len(staged.prune_points))]).any(dim=0)  # at some pruning point
        print(f"{row:<36} {100 * correct[row].mean():6.2f} {agree:8.2f} {kl:7.4f} "
              f"{100 * differs.double().mean():10.2f} {difference:+10.2f} [{low:+6.2f}, {high:+6.2f}]")


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone and problem")
    parser.add_argument("--train-images", type=positive_int, default=8000, help="train images the scorer trains on")
    parser.add_argument("--val-images", type=positive_int, default=2000,
                        help="validation images it is scored on (never the test split)")
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the train images")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per update")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="the scorer's Adam learning rate")
    parser.add_argument("--hidden", type=positive_int, default=64, help="width of the scorer's networks")
    parser.add_argument("--relational", action="store_true",
                        help="one self-attention layer over the tokens before each token's correction")
    parser.add_argument("--temperature", type=positive_float, default=0.02,
                        help="of the drawn sets, in keep-rank units (default: %(default)s)")
    parser.add_argument("--samples", type=leave_one_out_draws, default=4,
                        help="sets drawn per image (default: %(default)s)")
    parser.add_argument("--monitor-images", type=positive_int, default=1000,
                        help="train images the most likely sets' KL is printed for after each epoch")
    parser.add_argument("--seed", type=random_seed, default=0,
                        help="seed of the scorer and its samples")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    problem, staged, config = scorer_problem(args.checkpoint, "content_headroom")

    train_states, train_unpruned, _ = first_stage_states(staged, config, problem, args.data_dir, "train",
                                                           args.train_images)
    train = concat_states(train_states)
    scorer = ContentScorer(staged.embed_dim, args.hidden, args.relational)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=args.lr)

    def mode_kl() -> float:
        """The mean KL of the scorer's most likely sets on the first ``--monitor-images`` train images."""
        rows = torch.arange(min(args.monitor_images, len(train_unpruned)))
        with torch.no_grad():
            logits = torch.cat([exact_forward_from(staged, train.rows(chunk), scorer_selector(staged, scorer,
                                problem.target_ratio), problem.target_ratio, problem.reduction)
                                for chunk in rows.split(256)])
        return kl_from_unpruned(train_unpruned[rows], logits).mean().item()

    print(f"[train] {len(train_unpruned)} images x {args.samples} draws; most likely sets' KL(unpruned || pruned) "
          f"{mode_kl():.4f} (greedy similarity)", flush=True)
    for epoch in range(args.epochs):
        started, sampled = time.perf_counter(), []
        for images in torch.randperm(len(train_unpruned)).split(args.batch_size):
            rows = images.repeat_interleave(args.samples)
            logits, log_prob = sampled_episodes(staged, scorer, train.rows(rows), problem.target_ratio,
                                                args.temperature)
            reward = -kl_from_unpruned(train_unpruned[rows], logits).numpy()
            advantage = torch.as_tensor(reward - leave_one_out_means(reward, args.samples), dtype=torch.float32)
            loss = -(advantage * log_prob).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sampled.append(-reward.mean())
        print(f"[train] epoch {epoch}: drawn sets' KL {np.mean(sampled):.4f}, most likely sets' {mode_kl():.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    print_validation(staged, config, problem, args.data_dir, args.val_images,
                     {"content scorer (trained on train)": scorer_selector(staged, scorer, problem.target_ratio)})


if __name__ == "__main__":
    run_from_command_line(main)
