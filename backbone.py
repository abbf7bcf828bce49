"""Train from scratch or fine-tune a timm ViT: the backbone that the agents learn to prune.

Reads the ``train`` split (minus the seeded ``val`` subset), picks nothing on ``test``, and reports
test accuracy once at the end for the model card. Needs torch + timm + safetensors only (no Ray), so it
runs on any GPU box. Decoded images live in one uint8 tensor on the device and are augmented there, per
image (envs/vit/augment.py). A training step neither copies from the host nor reads a value back, so on a GPU
the host queues steps ahead and the device sets the pace (TrainingStep in
backbone_training/training_step.py says how).

    python backbone.py --data-dir ../shared/data --output-dir runs/backbone
    python backbone.py --output-dir runs/backbone --resume      # continue after --time-limit or a crash
    python backbone.py --data-dir ../shared/data --output-dir runs/backbone_fast --batch-size 512 --compile
                                                # on a GPU: larger batches, compiled
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone_training.init_from import init_from_export, read_init_from
from backbone_training.model_card import export_with_card, measurements, run_recipe
from backbone_training.model_geometry import model_geometry, parse_kwargs
from backbone_training.splits import data_config, fitted_batch_size, read_test_accuracy, training_data
from backbone_training.time_budget import fit_time_budget
from backbone_training.training_state import (
    STATE_FILE,
    check_same_data,
    read_state,
    restore_state,
    save_state,
    training_snapshot,
)
from backbone_training.training_step import (
    accuracy,
    build_training_step,
    resolve_amp,
    run_epoch,
    warn_if_warmup_fills,
)
from cli import (
    OneLineParser,
    add_data_access_arguments,
    already_holds_a_run,
    check_output_dir,
    code_commit,
    command_words,
    duration_in,
    interrupted_go_on_line,
    named_directory,
    non_negative_float,
    non_negative_int,
    output_directory,
    positive_float,
    positive_int,
    random_seed,
    resume_command,
    resume_conflict,
    run_command_line,
    versions_line,
)
from envs.errors import UsageError
from envs.vit.augment import NUM_BINS
from envs.vit.backbone_checkpoint import CONFIG_FILE, RUN_EXPORT_DIR, create_vit
from envs.vit.data import (
    DATASETS,
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_SIZE,
    StreamedImages,
    absolute_data_dir,
    check_recorded_data_dir,
    default_data_dir,
)
from envs.vit.device import DEVICE_CHOICES, resolve_device

DEFAULT_EPOCHS = 185


def randaug_magnitude(text: str) -> int:
    """An argparse ``type``: one of RandAugment's magnitude bins, 0 to 30."""
    value = non_negative_int(text)
    if value >= NUM_BINS:
        raise argparse.ArgumentTypeError(f"must be at most {NUM_BINS - 1} (torchvision's bins), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="vit_tiny_patch16_224",
                       help="timm model name (default: vit_tiny_patch16_224)")
    model.add_argument("--model-kwargs", nargs="*", default=["img_size=32", "patch_size=4", "drop_path_rate=0.1"],
                       metavar="K=V", help="timm create_model kwargs (default: img_size=32 patch_size=4 "
                                          "drop_path_rate=0.1); given, they replace the defaults: add "
                                          "drop_path_rate=0.1 to keep stochastic depth")
    model.add_argument("--pretrained", action="store_true",
                       help="start from timm's pretrained weights (from the Hugging Face Hub, or its local cache)")
    model.add_argument("--init-from", type=named_directory, default=None, metavar="DIR",
                       help="start from the weights of a backbone this script exported (e.g. "
                            "reference/vit_tiny_cifar10), trained on the same splits, with a fresh warm-up and cosine "
                            "schedule: a second cycle that lengthens its training without its optimiser state")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=DATASETS,
                      help="cifar10 (the default) and cifar100 as torchvision or the README (\"Data and splits\") "
                           "lays them out; folder: train/ and test/ (or val/) class directories under --data-dir, or "
                           ".tars of them")
    data.add_argument("--data-dir", type=named_directory, default=default_data_dir(),
                      help="where the data set lives (default: $MARL_PRUNING_DATA_DIR, else ./data; see README, \"Data "
                           "and splits\")")
    add_data_access_arguments(data)
    data.add_argument("--val-size", type=positive_int, default=DEFAULT_VAL_SIZE,
                      help=f"training images held out as the validation split (default: {DEFAULT_VAL_SIZE}); the "
                           f"checkpoint records it, and train.py and evaluate.py hold out the same")
    data.add_argument("--split-seed", type=random_seed, default=DEFAULT_SPLIT_SEED,
                      help=f"seed of the train/validation split (default: {DEFAULT_SPLIT_SEED})")
    data.add_argument("--limit", type=positive_int, default=None, metavar="N",
                      help="train and test on a seeded subset of N images of their splits, and validate on the first N "
                           "held-out images, the split the checkpoint records (smoke tests)")
    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=positive_int, default=None,
                        help=f"schedule length (default: {DEFAULT_EPOCHS}); on --resume, a new length shortens or "
                             "extends the schedule")
    recipe.add_argument("--batch-size", type=positive_int, default=256, help="images per step (default: 256)")
    recipe.add_argument("--lr", type=positive_float, default=3e-3,
                        help="peak learning rate for batch 512, scaled linearly (default: 3e-3)")
    recipe.add_argument("--weight-decay", type=non_negative_float, default=0.05,
                        help="AdamW's weight decay (default: 0.05)")
    recipe.add_argument("--warmup-epochs", type=non_negative_float, default=10,
                        help="linear warm-up before the cosine schedule (default: 10)")
    recipe.add_argument("--label-smoothing", type=non_negative_float, default=0.1,
                        help="label smoothing of the targets, in [0, 1) (default: 0.1)")
    recipe.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha (default: 0.8; 0 = off)")
    recipe.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha (default: 1.0; 0 = off)")
    recipe.add_argument("--randaug", type=non_negative_int, default=2,
                        help="RandAugment ops per image (default: 2; 0 = off)")
    recipe.add_argument("--randaug-magnitude", type=randaug_magnitude, default=9,
                        help="0 to 30: m/30 of each op's largest change, as torchvision's RandAugment (default: 9; "
                             "refused with --randaug 0, which builds none)")
    recipe.add_argument("--seed", type=random_seed, default=0,
                        help="seed of the initial weights, augmentation and batch order (default: 0)")
    run = p.add_argument_group("where and how long it runs")
    run.add_argument("--device", default="auto",
                     help=f"where it trains: {DEVICE_CHOICES} (default: auto, a GPU when one is visible)")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="train and validate in bf16 autocast (default: on a GPU; --no-amp: float32). A CPU runs "
                          "float32 by default: without native bf16 (AVX2 only) autocast made an epoch 20 times as long")
    run.add_argument("--compile", action="store_true",
                     help="train the model through torch.compile: compiling takes about a minute when the run (or a "
                          "--resume) starts and pays off on long GPU runs; the weights saved are the same")
    run.add_argument("--time-limit", type=duration_in("s"), default=None, metavar="SECONDS",
                     help="stop (resumably) after the first epoch that ends past this many seconds (or a duration "
                          "with a unit: 20m, 1.5h) (default: no limit)")
    run.add_argument("--time-budget", type=duration_in("s"), default=None, metavar="SECONDS",
                     help="train as many epochs as fit in this many seconds (or 20m, 1.5h) from this process's start "
                          "(a --resume's budget starts anew), the test reading and export included: "
                          "the schedule's length is set from the second epoch's measured time (the first pays for "
                          "compiling; where no second is scheduled, from the first's, then again from the second's), "
                          "replacing --epochs; two epochs' time, and a minute more with --compile, is kept for the "
                          "test reading and export")
    run.add_argument("--save-every", type=positive_int, default=1, metavar="EPOCHS",
                     help="write train_state.pt (weights, optimiser and random streams: 66 MB for the reference) every "
                          "this many epochs, at a --time-limit stop and at the end; a crash loses at most this many "
                          "(default: 1)")
    output = p.add_argument_group("output")
    output.add_argument("--output-dir", type=output_directory, default="runs/backbone",
                        help="the run's directory (default: runs/backbone): the training state (train_state.pt), and "
                             "the checkpoint with its model card in OUTPUT_DIR/backbone")
    output.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/train_state.pt")
    output.add_argument("--overwrite", action="store_true", help="discard a previous run in OUTPUT_DIR")
    output.add_argument("--half", action="store_true", default=True, help="export float16 weights (default)")
    output.add_argument("--full-precision", dest="half", action="store_false", help="export float32 weights")
    return p


# What a resumed run takes from its command line: how long and where it runs, and how it reaches the data (the
# data directory only when given, so that a run moved to another machine finds its data there). Every other
# flag is the recipe it recorded.
RESUME_FLAGS = ("time_limit", "time_budget", "save_every", "device", "compile", "output_dir", "download",
                "memory_budget_mb")


def spelled_setting(flag: str, value: Any) -> tuple[str, str]:
    """How a command line says that ``flag`` (an argparse ``dest``) is ``value``, as (its option, the setting):
    :func:`cli.command_words` as one string, or the option left out (``without --pretrained``, ``without
    --limit``)."""
    option, words = command_words(build_parser(), flag, value)
    return option, " ".join(words) or f"without {option}"


def go_on_command(args: argparse.Namespace, given: Collection[str]) -> str:
    """The command that goes on with the run in ``args.output_dir`` after a stop or an interrupt: ``--resume``,
    with the flags of the command line that are not recorded (those of :data:`RESUME_FLAGS` and ``--data-dir``
    among ``given``, :func:`given_flags`), as ``args`` has them; a resumed run takes those from its own command
    line, so without them it would go on without its ``--time-budget``, ``--device``, ``--compile``, ... The
    schedule's length goes too where it was given or changed since the run began: the state on disk records it
    only from its next save."""
    carried = [flag for flag in (*RESUME_FLAGS, "data_dir") if flag in given and flag != "output_dir"]
    if "epochs" in given or getattr(args, "schedule_changes", []):
        carried.append("epochs")
    return resume_command("backbone.py", build_parser(), args, carried)


def resumed_args(args: argparse.Namespace, state: dict, given: Collection[str]) -> argparse.Namespace:
    """The settings of a run resumed from ``state`` (its train_state.pt) by the command line ``args``, whose
    flags named on it are ``given``: the recorded recipe, with :data:`RESUME_FLAGS`, a given ``--data-dir``
    and a longer or shorter ``--epochs`` from ``args`` (a changed schedule length is recorded). A recipe
    flag given with another value than the recorded one is refused rather than ignored."""
    saved = dict(state["args"])
    if "amp" not in saved:  # a state that records "no_amp" instead: autocast unless it is set
        saved["amp"] = not saved.pop("no_amp")
    for flag in sorted(given):
        value = getattr(args, flag)
        if flag in (*RESUME_FLAGS, "data_dir", "epochs", "resume", "overwrite") or value == saved.get(flag, value):
            continue
        (given_option, _), (_, recorded) = spelled_setting(flag, value), spelled_setting(flag, saved[flag])
        raise UsageError(f"--resume continues the run it recorded ({recorded}): {given_option} cannot change it "
                         f"(start a new run with --init-from its export instead)")
    epochs = args.epochs if args.epochs is not None else saved["epochs"]
    done = state["epoch"]
    finished = any(reading["epoch"] == done for reading in state.get("test_readings", []))
    if epochs < done or (epochs == done and finished):
        raise UsageError(f"--resume: the run has trained {done} epochs{' and read the test split' if finished else ''}"
                         f": pass --epochs more than {done} to lengthen it")
    data_dir = args.data_dir if "data_dir" in given else saved["data_dir"]
    if "data_dir" not in given:
        check_recorded_data_dir(data_dir)
    schedule = saved.get("schedule_changes", [])
    if epochs != saved["epochs"]:
        schedule = [*schedule, {"at_epoch": state["epoch"], "epochs": epochs}]
        print(f"schedule length changed from {saved['epochs']} to {epochs} epochs at epoch {state['epoch']}")
    return argparse.Namespace(**{**saved, **{flag: getattr(args, flag) for flag in RESUME_FLAGS}, "resume": True,
                                 "epochs": epochs, "schedule_changes": schedule, "data_dir": data_dir})


def run_one_level_up(out: Path) -> str:
    """What to add to an error about ``--output-dir out`` when ``out`` is the export of the backbone.py run in the
    directory above (the export is the directory train.py and evaluate.py take): that run's directory."""
    if out.name == RUN_EXPORT_DIR and (out.parent / STATE_FILE).exists():
        return f" ({out} is the export of the run in {out.parent}: pass --output-dir {out.parent})"
    return ""


def train(args: argparse.Namespace, given: Collection[str]) -> None:
    """Train (or resume, ``args.resume``) the backbone ``args`` describes; ``given`` names the flags the
    command line set (:func:`given_flags`), which a resumed run checks against its recorded recipe."""
    started = time.time()  # --time-budget counts from here: decoding the data and building the model take a while
    commit = code_commit()  # the code this (re)start runs, not what the tree holds when it ends
    device = resolve_device(args.device)
    out = Path(args.output_dir).expanduser()
    check_run_directory(args, out)
    state_path = out / STATE_FILE
    state = read_state(state_path) if args.resume else None
    args = run_settings(args, state, given, device)
    geometry = model_geometry(args)
    init_export = read_init_from(args.init_from) if state is None and args.init_from is not None else None
    train_split, val_split = training_data(args, geometry.input_size, device)
    config = data_config(args, geometry, train_split, val_split)
    if state is not None:
        check_same_data(state.get("data"), config, args.data_dir)
    num_classes = config["num_classes"]
    model = create_vit(args.model, num_classes, geometry.kwargs,
                       pretrained=args.pretrained and state is None).to(device)
    if init_export is not None:
        args.init_summary = init_from_export(model, args.init_from, init_export, config)
        del init_export
    batch_size = fitted_batch_size(args, len(train_split))
    args.batch_size = batch_size  # the learning rate is scaled for the batch that trains, and the recipe records it
    steps_per_epoch = len(train_split) // batch_size
    step = build_training_step(args, model, num_classes, steps_per_epoch, config, device)

    history, start_epoch, test_readings = [], 0, []
    snapshot = state  # what train_state.pt holds now
    if state is not None:
        history, start_epoch, test_readings = state["history"], state["epoch"], state.get("test_readings", [])
        restore_state(state, model, step, reseed=args.seed + start_epoch, device=device)
        print(f"resuming {out} at epoch {start_epoch}/{args.epochs}")
    out.mkdir(parents=True, exist_ok=True)

    streamed = isinstance(train_split.images, StreamedImages)
    images = train_split.images if streamed else train_split.images.to(device)
    labels = train_split.labels.to(device)
    process_start = time.time()
    began = process_start - (history[-1]["seconds"] if history else 0.0)  # elapsed time spans resumes
    epoch = start_epoch
    while epoch < args.epochs:  # --time-budget may change args.epochs
        model.train()
        loss_sum = run_epoch(step, images, labels, batch_size, steps_per_epoch, epoch * steps_per_epoch,
                             progress=f"epoch {epoch + 1}/{args.epochs}")
        mean_loss = loss_sum.item() / steps_per_epoch
        val_acc = accuracy(model, val_split, config, device, amp=args.amp)
        history.append({"epoch": epoch + 1, "loss": mean_loss, "val_accuracy": val_acc,
                        "seconds": time.time() - began})
        print(f"epoch {epoch + 1}/{args.epochs} loss {mean_loss:.4f} "
              f"val {100 * val_acc:.2f}% ({time.time() - began:.0f}s)", flush=True)
        if args.time_budget is not None:
            fit_time_budget(args, step, history, epoch, start_epoch, started, steps_per_epoch)
        snapshot = training_snapshot(args, model, step, device, history, epoch, test_readings, config)
        over_time = args.time_limit is not None and time.time() - process_start > args.time_limit
        stopping = over_time and epoch + 1 < args.epochs
        if stopping or (epoch + 1) % args.save_every == 0:  # the last epoch's is saved with the test reading
            save_state(state_path, snapshot)
        if stopping:
            print(f"time limit reached after epoch {epoch + 1}; continue with {go_on_command(args, given)}")
            return
        epoch += 1

    print("reading the test split once, for the model card", flush=True)
    test_acc, test_size = read_test_accuracy(args, model, config, device)
    test_readings = [*test_readings, {"epoch": args.epochs, "test_accuracy": test_acc}]
    if snapshot is not None:  # a later --resume --epochs must know the test split has been read
        save_state(state_path, {**snapshot, "test_readings": test_readings})
    config.update(split_sizes={**config["split_sizes"], "test": test_size}, recipe=run_recipe(args, history, device),
                  history=history, test_accuracy=test_acc, test_readings=test_readings,
                  **measurements(model, config, device), commit=commit, versions=versions_line())
    export = export_with_card(model, config, out / RUN_EXPORT_DIR, half=args.half)
    print(f"test {100 * test_acc:.2f}% on {test_size} images, {config['gflops']:g} GFLOPs a forward: exported to "
          f"{export}")


def check_run_directory(args: argparse.Namespace, out: Path) -> None:
    """Refuse, before anything is read or built, an ``--output-dir`` that does not hold what ``--resume`` or
    ``--overwrite`` (or neither) expects: a run to continue, one to replace, or nothing of a run. A
    ``UsageError`` that names the flag to pass."""
    check_output_dir(out, str(out))
    state_path = out / STATE_FILE
    exported = (out / RUN_EXPORT_DIR / CONFIG_FILE).is_file()
    if args.resume and args.overwrite:
        raise UsageError(resume_conflict("--overwrite replaces it"))
    if not (args.resume or args.overwrite):
        if state_path.exists():
            raise UsageError(already_holds_a_run(out))
        if exported:  # a finished run's export alone
            raise UsageError(f"{out} already holds an exported backbone ({out / RUN_EXPORT_DIR}): pass --overwrite "
                             f"to replace it, or start from it with --init-from {out / RUN_EXPORT_DIR} in another "
                             f"--output-dir")
    if args.resume and not state_path.exists():
        raise UsageError(f"nothing to resume: {state_path} does not exist{run_one_level_up(out)}")
    staged = f".{STATE_FILE}.tmp"  # what a save killed before it finished leaves (envs.atomic_file)
    if (not (state_path.exists() or exported) and out.is_dir()
            and any(path.name != staged for path in out.iterdir())):
        raise UsageError(f"{out} is not empty and holds no backbone.py run: choose another --output-dir"
                         f"{run_one_level_up(out)}")


def run_settings(args: argparse.Namespace, state: dict | None, given: Collection[str],
                 device: torch.device) -> argparse.Namespace:
    """The settings the run trains with: a resumed run's recorded recipe (:func:`resumed_args`), else the command
    line's with the default schedule length; the data directory absolute and ``amp`` resolved for ``device``,
    both as the state records them. Seeds torch's and numpy's generators, and warns of a warm-up that fills the
    whole schedule that ``--epochs`` sets (:func:`warn_if_warmup_fills`)."""
    if state is not None:
        args = resumed_args(args, state, given)
    elif args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    if state is None or "data_dir" in given:  # recorded absolute: a resumed run may start in another directory
        args.data_dir = absolute_data_dir(args.data_dir)
    # where --epochs sets the schedule's length: a new run, or a resumed one given another; a --time-budget sets
    # it once an epoch is timed (fit_time_budget)
    if args.time_budget is None and (state is None or args.epochs != state["args"]["epochs"]):
        warn_if_warmup_fills(args)
    args.amp = resolve_amp(args.amp, device)  # recorded resolved: a resumed run keeps it on any device
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # timm's mixup draws from numpy's global generator
    return args


def check_args(args: argparse.Namespace, given: Collection[str]) -> None:
    """What the flags' types cannot check alone, before anything is built: a ``UsageError`` for settings that do
    not go together (backbone.py's and benchmarks/backbone_step.py's), and for a flag named on the command line
    (``given``, :func:`given_flags`) that the others leave without effect."""
    if args.randaug == 0 and "randaug_magnitude" in given:
        raise UsageError("--randaug-magnitude: --randaug 0 builds no RandAugment, so no magnitude is used: drop one "
                         "of them")
    if args.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.init_from is not None and (args.resume or args.pretrained):
        raise UsageError(f"--init-from starts a new run from exported weights: it cannot be combined with "
                         f"{'--resume' if args.resume else '--pretrained'}")
    if args.batch_size % 2 and (args.mixup > 0 or args.cutmix > 0):
        raise UsageError(f"--batch-size {args.batch_size}: timm's mixup and cutmix pair each image with another "
                         f"of its batch, so the batch must be even (or pass --mixup 0 --cutmix 0)")
    parse_kwargs(args.model_kwargs)


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace, given: frozenset[str]) -> int:
        check_args(args, given)
        train(args, given)
        return 0

    def interrupted_line(args: argparse.Namespace | None, given: frozenset[str]) -> str:
        if args is None or not (Path(args.output_dir) / STATE_FILE).exists():
            return "interrupted before an epoch was saved: run the command again"
        return interrupted_go_on_line(go_on_command(args, given))

    return run_command_line(build_parser, argv, run, interrupted_line)


if __name__ == "__main__":
    sys.exit(main())
