"""Is pruning still faster than not pruning at real sizes? Every row's speed on a 224-px ViT (196 patches).

    python -m benchmarks.speed_at_224 --data-dir ../shared/data        # about 5 minutes on a 2-core CPU

The reference backbone sees 64 patches; at 224 px a ViT sees 196, and whatever a selection computes per
pruning point grows with them: greedy similarity's sequential removal takes up to ``n / 2`` steps of an
``[n, n]`` matrix, while the agents' features are one-shot (``envs.vit.features``). This builds DeiT-Tiny's
geometry (``vit_tiny_patch16_224``: 12 blocks, width 192, 196 patches; ``--reg-tokens`` adds register tokens)
with seeded random weights (speed does not depend on what the weights are, and weights cannot be downloaded
here), runs the committed policy modules on it (they score each token alone, so they take any number of
tokens), and times every row of evaluate.py's table with evaluate.py's own
``evaluation.measure.evaluate_methods`` on CIFAR-10 validation images resized to 224 px. It prints GFLOPs,
images/s at batch 1 and 256 and ``speedup`` (images/s at batch 256 over the unpruned model's, measured side by
side in this run); no accuracy, since the weights are untrained.
"""

from __future__ import annotations

import pandas as pd
import torch

from benchmarks import add_data_dir_argument, benchmark_parser, run_from_command_line
from cli import non_negative_int, positive_int
from envs.problem import removal_ratio
from envs.vit.backbone_checkpoint import REFERENCE_POLICY, create_vit
from envs.vit.data import load_split
from envs.vit.staged_vit import StagedViT
from evaluation.measure import evaluate_methods
from evaluation.methods import plan_methods
from policies.checkpoints import load_policies

SHOWN = ["method", "budget", "gflops", "gflops_features", "images_per_s_b1", "images_per_s_b256", "speedup"]


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_dir_argument(parser)
    parser.add_argument("--checkpoint", default=str(REFERENCE_POLICY),
                        help="policy checkpoint (default: %(default)s)")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model at 224 px")
    parser.add_argument("--reg-tokens", type=non_negative_int, default=0, help="register tokens (default: %(default)s)")
    parser.add_argument("--budget", type=removal_ratio, default=0.5, help="target ratio (default: %(default)s)")
    parser.add_argument("--images", type=positive_int, default=256,
                        help="validation images timed (default: %(default)s)")
    parser.add_argument("--speed-repeats", type=positive_int, default=3,
                        help="timing rounds, each timing every row once, in turns (default: %(default)s)")
    args = parser.parse_args(argv)

    modules, info = load_policies(args.checkpoint)
    torch.manual_seed(0)
    kwargs = {"img_size": 224, **({"reg_tokens": args.reg_tokens} if args.reg_tokens else {})}
    vit = create_vit(args.model, 10, kwargs).eval()
    staged = StagedViT(vit, info.problem.prune_points).eval()
    config = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": 224}
    split = load_split("cifar10", "val", args.data_dir, input_size=224, limit=args.images)
    methods = plan_methods([args.budget], {args.budget: (modules, info.problem)})
    table = evaluate_methods(staged, config, split, methods, info.problem.reduction,
                             speed_repeats=args.speed_repeats).table
    print(f"{args.model} {kwargs}, {staged.num_patches} patches, prune points {staged.prune_points}, "
          f"{torch.get_num_threads()} torch threads, policy {args.checkpoint}")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table[SHOWN].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    run_from_command_line(main)
