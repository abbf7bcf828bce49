"""Where one ``backbone.py`` training step spends its time, part by part, on the device it runs on.

The reference backbone's H100 run took 43 ms per step of 256 images, while the same model evaluates at
about 31,900 images/s: the loop, not the GPU, sets the pace. This times the step's parts with the same
functions ``backbone.py`` uses, each followed by a device sync (so each row is that part alone), then the
plain loop with no sync inside (what training gets). If the loop is slower than its parts' sum, or their
sum is far above the forward/backward row, host work and host-device syncs dominate.

Needs torch + timm only (no data set: random uint8 images), so it runs on a bare GPU box::

    python -m benchmarks.backbone_step                          # the reference recipe, on cuda when present
    python -m benchmarks.backbone_step --batch-size 1024 --randaug 0 --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2

import backbone
from envs.vit.backbone_checkpoint import create_vit, normalize
from envs.vit.device import describe_device, resolve_device
from envs.vit.timing import median_seconds

EPOCH_IMAGES = 45_000  # the CIFAR-10 train split minus the 5,000 validation images


def build_parser() -> argparse.ArgumentParser:
    """backbone.py's own options (model, recipe, device), plus how long to measure."""
    parser = backbone.build_parser()
    parser.description = __doc__
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the rows here")
    return parser


def measure(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    amp = not args.no_amp
    kwargs = backbone.parse_kwargs(args.model_kwargs)
    size = kwargs.get("img_size", 224)
    config = {"mean": list(backbone.CIFAR_MEAN), "std": list(backbone.CIFAR_STD)}
    model = create_vit(args.model, args.num_classes, kwargs).to(device).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr * args.batch_size / 512,
                                    weight_decay=args.weight_decay)
    mixup, criterion = backbone.make_mixup_and_loss(args, args.num_classes)
    randaugment = backbone.make_randaugment(args.randaug, args.randaug_magnitude)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    cropped = backbone.random_crop_flip(images, 4, generator)
    x, y = backbone.augment_batch(images, labels, generator, randaugment, mixup, config)

    def mix():
        normalized = normalize(cropped, config)
        return mixup(normalized, labels) if mixup is not None else normalized

    def loop():  # what backbone.py runs per step, with no sync inside
        for _ in range(args.steps):
            xb, yb = backbone.augment_batch(images, labels, generator, randaugment, mixup, config)
            backbone.optimize_step(model, xb, yb, criterion, optimizer, amp)

    parts = {"crop + flip": lambda: backbone.random_crop_flip(images, 4, generator),
             "RandAugment": (lambda: randaugment(cropped)) if randaugment is not None else None,
             "normalize + mixup/cutmix": mix,
             "forward + backward + AdamW": lambda: backbone.optimize_step(model, x, y, criterion, optimizer, amp)}
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
    args = build_parser().parse_args(argv)
    try:
        rows = measure(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = describe_device(resolve_device(args.device))
    print(f"{args.model} {' '.join(args.model_kwargs)}, batch {args.batch_size}, "
          f"{'bf16 autocast' if not args.no_amp else 'float32'}, {device}, torch {torch.__version__}")
    print(f"| part | ms per step | s per {EPOCH_IMAGES}-image epoch |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['part']} | {row['ms_per_step']:.2f} | {row['epoch_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "batch_size": args.batch_size, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
