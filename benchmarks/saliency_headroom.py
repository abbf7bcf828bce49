"""Which tokens does the model itself need? Oracle selectors that read the gradient of its answer.

    python -m benchmarks.saliency_headroom --data-dir ../shared/data      # about 4 minutes on a 2-core CPU

``content_headroom`` and ``search_distil`` asked whether a learned per-token score beats greedy similarity; on
this backbone it did not. This asks the question before any learning: is there a per-token score that beats
it, given what no policy sees at a pruning point? At each pruning point the rest of the forward runs on every
token there (no more pruning), and the gradient of the log-probability of its answer (the unpruned model's
answer at the first pruning point; the label is never read) with respect to each patch token says how much
that answer depends on it (gradient attribution, as in Taylor-expansion pruning). Two oracles keep the ``k``
tokens it depends on most:

- ``gradient norm``: the norm of each token's gradient;
- ``gradient x input``: the magnitude of the first-order change in the log-probability if the token were
  zeroed, ``|g . x|``.

Each costs a backward pass through the rest of the model per pruning point, so neither ships; if they do not
beat greedy similarity, a policy that learns to predict them (from the embeddings, say) cannot either. The
table is ``content_headroom``'s validation table (accuracy, agreement, KL, how often the kept sets differ from
greedy similarity's, the paired difference with its bootstrap 95% interval), on validation images only.

Measured (reference backbone, r = 0.5, merging, 2,000 validation images, this 2-core CPU): see
benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks import add_data_and_checkpoint_arguments, benchmark_parser, checkpoint_backbone, run_from_command_line
from benchmarks.content_headroom import print_validation
from cli import positive_int
from envs.vit.pruned_forward import Selector, TokenState
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest

TokenSaliency = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(gradient, tokens)``, both ``[B, W, D]`` -> ``[B, W]``: how much the answer depends on each token."""

SALIENCIES: dict[str, TokenSaliency] = {
    "gradient norm": lambda gradient, tokens: gradient.norm(dim=-1),
    "gradient x input": lambda gradient, tokens: (gradient * tokens).sum(dim=-1).abs(),
}


def answer_gradient(staged: StagedViT, state: TokenState, reduction: str) -> torch.Tensor:
    """``[B, W, D]``: the gradient of the log-probability of the answer that the stages after ``state`` give
    when they run on every token of it (an unpadded state, as an exact budget leaves), with respect to its
    patch tokens. At the first pruning point that answer is the unpruned model's."""
    with torch.enable_grad():
        tokens = state.tokens.detach().requires_grad_(True)
        log_probs = staged.forward_from(tokens, state.stage + 1,
                                        state.size if reduction == "merge" else None).log_softmax(dim=-1)
        answer = log_probs.detach().argmax(dim=1, keepdim=True)
        (gradient,) = torch.autograd.grad(log_probs.gather(1, answer).sum(), tokens)
    return gradient[:, state.num_prefix:]


def saliency_selector(staged: StagedViT, reduction: str, saliency: TokenSaliency) -> Selector:
    """An exact-budget ``Selector`` that keeps the ``k`` tokens of highest ``saliency``."""

    def select(state: TokenState, k: int) -> torch.Tensor:
        score = saliency(answer_gradient(staged, state, reduction), state.patches)
        return highest(score, k, state.live, state.live.shape[1])

    return select


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone and problem: pruning points, ratio, reduction")
    parser.add_argument("--val-images", type=positive_int, default=2000,
                        help="validation images it is scored on (never the test split)")
    args = parser.parse_args(argv)

    problem, staged, config = checkpoint_backbone(args.checkpoint)
    staged.requires_grad_(False)  # gradients with respect to the tokens only
    print_validation(staged, config, problem, args.data_dir, args.val_images,
                     {f"oracle: {name}": saliency_selector(staged, problem.reduction, saliency)
                      for name, saliency in SALIENCIES.items()})


if __name__ == "__main__":
    run_from_command_line(main)
