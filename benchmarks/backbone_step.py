"""Where one ``backbone.py`` training step spends its time, part by part, on the device it runs on.

The reference backbone's H100 run took 43 ms per step of 256 images, while the same model evaluates at
about 31,900 images/s: the loop, not the GPU, set the pace. This times the step's parts with the objects
``backbone.py`` builds (``build_training_step``), each followed by a device sync (so each row is that part
alone), then ``run_epoch`` over ``--steps`` steps with no sync inside (what training gets). If the
loop is slower than its parts' sum, or their sum is far above the forward/backward row, host work and
host-device syncs dominate; if the loop is close to the forward/backward row, the device sets the pace.

Needs torch + timm only (no data set: random uint8 images), so it runs on a bare GPU box::

    python -m benchmarks.backbone_step                          # the reference recipe, on cuda when present
                                                                # (a CPU runs float32 unless given --amp)
    python -m benchmarks.backbone_step --batch-size 512 --compile --steps 20    # the fast GPU recipe
"""

from __future__ import annotations

import argparse

import torch

import backbone
from backbone_training.model_geometry import CIFAR_MEAN, CIFAR_STD, parse_kwargs, square_input_size
from backbone_training.training_step import build_training_step, resolve_amp, run_epoch
from benchmarks import HelpFormatter, run_from_command_line, write_json
from cli import given_flags, non_negative_int, positive_int
from envs.vit.augment import random_crop_flip
from envs.vit.backbone_checkpoint import create_vit, normalize
from envs.vit.data import DEFAULT_VAL_SIZE
from envs.vit.device import describe_device, resolve_device
from envs.vit.timing import median_seconds

EPOCH_IMAGES = 50_000 - DEFAULT_VAL_SIZE  # CIFAR-10's train split less backbone.py's validation images
NOT_A_STEP = frozenset({"pretrained", "init_from", "dataset", "data_dir", "download", "memory_budget_mb", "limit",
                        "val_size", "split_seed", "time_limit", "time_budget", "save_every", "output_dir", "resume",
                        "overwrite", "half", "epochs", "lr", "warmup_epochs", "label_smoothing"})
"""backbone.py's flags about data, weights, how long it runs and what it writes, which a step on random images
reads none of, and the recipe's numbers that change the values a step computes but not its work: the learning
rate and its warm-up and cosine schedule (host arithmetic each step, and AdamW's lr is a number), and label
smoothing (the targets' values; the loss is the same operations for any). They are refused rather than ignored.
``--weight-decay`` is not among them: at 0 timm's AdamW has one parameter group, not two, and no decay."""


def build_parser() -> argparse.ArgumentParser:
    """backbone.py's options (those of its model, recipe and device apply: :data:`NOT_A_STEP` are refused and left
    out of ``--help``), plus how long to measure."""
    parser = backbone.build_parser()
    parser.description, parser.formatter_class = __doc__, HelpFormatter
    for action in parser._actions:  # refused, so not offered in --help
        if action.dest in NOT_A_STEP:
            action.help = argparse.SUPPRESS
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first")
    parser.add_argument("--num-classes", type=positive_int, default=10, help="classes of the model's head")
    parser.add_argument("--output", "--json", dest="json", default=None, metavar="PATH",
                        help="also write the rows here, as JSON")
    return parser


def measure(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    kwargs = parse_kwargs(args.model_kwargs)
    config = {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    model = create_vit(args.model, args.num_classes, kwargs).to(device).train()
    size = square_input_size(model, kwargs)
    args.epochs = backbone.DEFAULT_EPOCHS  # the schedule needs a length; a step's time does not (NOT_A_STEP)
    step = build_training_step(args, model, args.num_classes, EPOCH_IMAGES // args.batch_size, config, device)
    images = torch.randint(0, 256, (args.steps * args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.num_classes, (len(images),), device=device)
    batch, batch_labels = images[:args.batch_size], labels[:args.batch_size]
    cropped = random_crop_flip(batch, 4, step.generator)
    x, y = step.augment(batch, batch_labels)

    def mix():
        normalized = normalize(cropped, config)
        return step.mixup(normalized, batch_labels) if step.mixup is not None else normalized

    def loop():  # what backbone.py runs for an epoch of --steps steps, with no sync inside
        run_epoch(step, images, labels, args.batch_size, args.steps, 0)

    randaugment = step.randaugment
    parts = {"crop + flip": lambda: random_crop_flip(batch, 4, step.generator),
             "RandAugment": (lambda: randaugment(cropped, step.generator)) if randaugment is not None else None,
             "normalize + mixup/cutmix": mix,
             "forward + backward + AdamW": lambda: step.optimize(x, y)}
    rows = [{"part": name, "ms_per_step": round(1000 * median_seconds(fn, repeats=args.steps, warmup=args.warmup,
                                                                      device=device), 3)}
            for name, fn in parts.items() if fn is not None]
    rows.append({"part": "sum of the parts", "ms_per_step": round(sum(r["ms_per_step"] for r in rows), 3)})
    loop_ms = 1000 * median_seconds(loop, repeats=1, warmup=1, device=device) / args.steps
    rows.append({"part": "training loop (no sync inside)", "ms_per_step": round(loop_ms, 3)})
    for row in rows:
        row["epoch_s"] = round(row["ms_per_step"] / 1000 * EPOCH_IMAGES / args.batch_size, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    ignored = given & NOT_A_STEP
    if ignored:
        names = ["/".join(action.option_strings[0] for action in parser._actions if action.dest == dest)
                 for dest in sorted(ignored)]  # --half/--full-precision: one setting
        parser.error(f"{', '.join(names)}: a training step on random images does not use them, or takes as long "
                     "whatever they are (backbone.py's data, weights, duration and outputs; the learning rate, its "
                     "schedule and label smoothing)")
    backbone.check_args(args, given)
    rows = measure(args)
    device = resolve_device(args.device)
    precision = "bf16 autocast" if resolve_amp(args.amp, device) else "float32"
    compiled = ", torch.compile" if args.compile else ""
    described = describe_device(device)
    print(f"{args.model} {' '.join(args.model_kwargs)}, batch {args.batch_size}, {precision}{compiled}, "
          f"{described}, torch {torch.__version__}")
    print(f"| part | ms per step | s per {EPOCH_IMAGES}-image epoch |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['part']} | {row['ms_per_step']:.2f} | {row['epoch_s']:.2f} |")
    write_json(args.json, {"device": described, "batch_size": args.batch_size, "rows": rows})
    return 0


if __name__ == "__main__":
    run_from_command_line(main)
