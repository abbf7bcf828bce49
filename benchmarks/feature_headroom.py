"""How much can the agents learn from what they observe? A search over linear scorings of their features.

    python -m benchmarks.feature_headroom --data-dir ../shared/data      # about 12 minutes on a 2-core CPU

The agents score each token from the features of ``envs.vit.features``. Whether PPO can beat the heuristic it
is warm-started from depends first on whether any scoring of those features does. This searches, with the
cross-entropy method, the similarity agent's removal score as a linear function of every feature either agent
sees (the similarity features plus the attention agent's ``attention``, ``log_attention`` and
``attention_rank``), the attention agent keeping the most attended tokens as in the warm start (the turns of
``policies.decisions``), starting at Distinctive NMS (weight 1 on ``distinct_suppression``, 0 elsewhere). It
maximises the training reward's label-free fidelity (``envs.pruning_env.fidelity`` with the checkpoint's
weights) on ``--train-images`` train images, then scores the search's best and final mean on
``--val-images`` validation images (never the test split) against the warm start's heuristic pair: accuracy,
agreement with the unpruned model, fidelity, and the paired accuracy difference with a bootstrap 95%
interval. A gain on train that vanishes on validation means the search fitted the train images' noise: the
features hold no scoring better than the heuristic, and new observations, not more PPO, are what would help.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import add_data_and_checkpoint_arguments, benchmark_parser, checkpoint_backbone, run_from_command_line
from benchmarks.split_states import first_stage_states
from cli import positive_int, random_seed
from envs.pruning_env import fidelity
from envs.vit.features import ATTENTION_FEATURES, SIMILARITY_FEATURES, observe
from envs.vit.pruned_forward import Selector, TokenState, exact_forward_from
from envs.vit.scoring import percent_equal
from envs.vit.staged_vit import StagedViT
from evaluation.compare import paired_difference
from policies.heuristics import heuristic_selector
from policies.warm_start import heuristic_turns

ATTENTION_ONLY = ("attention", "log_attention", "attention_rank")
FEATURES = (*SIMILARITY_FEATURES, *ATTENTION_ONLY)
"""The searched score's inputs: every feature either agent observes, once."""


def linear_pair(staged: StagedViT, weights: np.ndarray, target_ratio: float, protected_share: float) -> Selector:
    """The agents' turns with the attention agent keeping the most attended tokens and the similarity agent
    removing the highest ``weights . FEATURES`` among the others."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    attention_only = [ATTENTION_FEATURES.index(name) for name in ATTENTION_ONLY]

    def removal_scores(state: TokenState) -> torch.Tensor:
        observation = observe(staged, state, target_ratio)
        return torch.cat([observation.similarity, observation.attention[..., attention_only]], dim=-1) @ w

    return lambda state, k: heuristic_turns(state, target_ratio, removal_scores, "both", protected_share).survivors


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone, problem and reward weights")
    parser.add_argument("--train-images", type=positive_int, default=2048,
                        help="train images the search maximises fidelity on")
    parser.add_argument("--val-images", type=positive_int, default=2000,
                        help="validation images it is scored on (never the test split)")
    parser.add_argument("--generations", type=positive_int, default=10, help="cross-entropy method generations")
    parser.add_argument("--population", type=positive_int, default=16, help="scorings drawn per generation")
    parser.add_argument("--elite", type=positive_int, default=4,
                        help="best scorings each generation's distribution is refitted to")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the search's draws")
    args = parser.parse_args(argv)
    if args.elite > args.population:
        parser.error(f"--elite {args.elite}: the best of a --population of {args.population} cannot be more")

    problem, staged, config = checkpoint_backbone(args.checkpoint)

    def predict(states: list[TokenState], select: Selector) -> torch.Tensor:
        return torch.cat([exact_forward_from(staged, state, select, problem.target_ratio, problem.reduction)
                          for state in states]).softmax(-1)

    def pair(weights: np.ndarray) -> Selector:
        return linear_pair(staged, weights, problem.target_ratio, problem.protected_share)

    def mean_fidelity(probs: torch.Tensor, unpruned: torch.Tensor) -> float:
        agree = (probs.argmax(1) == unpruned).tolist()
        prob = probs.gather(1, unpruned[:, None])[:, 0].tolist()
        return float(np.mean([fidelity(problem, a, p) for a, p in zip(agree, prob, strict=True)]))

    with torch.no_grad():
        train_states, train_unpruned, _ = first_stage_states(staged, config, problem, args.data_dir, "train",
                                                                args.train_images)
        train_unpruned = train_unpruned.argmax(1)
        start = np.zeros(len(FEATURES))
        start[FEATURES.index("distinct_suppression")] = 1.0
        mean, std = start, np.full(len(FEATURES), 0.3)
        rng = np.random.default_rng(args.seed)
        best = (mean_fidelity(predict(train_states, pair(start)),
                                  train_unpruned), start)
        print(f"[search] {len(train_unpruned)} train images; warm-start pair fidelity {best[0]:.4f}", flush=True)
        for generation in range(args.generations):
            population = [mean] + [mean + std * rng.standard_normal(len(FEATURES)) for _ in range(args.population - 1)]
            scores = [mean_fidelity(predict(train_states, pair(w)),
                                    train_unpruned) for w in population]
            order = np.argsort(scores)[::-1]
            if scores[order[0]] > best[0]:
                best = (scores[order[0]], population[order[0]])
            elite = np.array([population[i] for i in order[:args.elite]])
            mean, std = elite.mean(0), elite.std(0) + 0.02
            print(f"[search] generation {generation}: best {scores[order[0]]:.4f}, mean's {scores[0]:.4f}",
                  flush=True)
        print("[search] best weights: " + ", ".join(f"{name} {w:+.2f}" for name, w in zip(FEATURES, best[1],
                                                                                          strict=True)))

        val_states, val_unpruned, labels = first_stage_states(staged, config, problem, args.data_dir, "val",
                                                                  args.val_images)
        val_unpruned = val_unpruned.argmax(1)
        rows = {"warm-start pair (attention protects, Distinctive NMS)": pair(start),
                "search best (on train)": pair(best[1]),
                "search final mean": pair(mean),
                "Distinctive NMS alone": heuristic_selector("distinct"),
                "greedy similarity": heuristic_selector("similarity")}
        probs = {name: predict(val_states, select) for name, select in rows.items()}
    correct = {name: (p.argmax(1) == labels).numpy().astype(float) for name, p in probs.items()}
    reference = next(iter(rows))
    print(f"[validation] {len(labels)} images, r = {problem.target_ratio}, {problem.reduction}")
    print(f"{'selection':<56} {'acc %':>6} {'agree %':>8} {'fidelity':>9} {'vs pair':>8} {'95% CI':>16}")
    for name in rows:
        difference, low, high = paired_difference(correct[name], correct[reference])
        agree = percent_equal(probs[name].argmax(1), val_unpruned)
        print(f"{name:<56} {100 * correct[name].mean():6.2f} {agree:8.2f} "
              f"{mean_fidelity(probs[name], val_unpruned):9.4f} {difference:+8.2f} "
              f"[{low:+6.2f}, {high:+6.2f}]")


if __name__ == "__main__":
    run_from_command_line(main)
