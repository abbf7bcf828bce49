"""Training episodes/s (image passes) of the default setup next to the batched pruned inference of the same
ViT, in one run.

PPO learns from the images that pass through pruning episodes, so its sample throughput is measured against
what the same machine does with the same ViT when it only infers: a ratio of 1 would mean training sees
images as fast as inference prunes them.

1. Training: ``train.py`` with its defaults (two env runners, the ViT servers, PPO's 4,096 agent steps per
   iteration) or the settings given after ``--``, ``--iterations`` iterations with no warm start and no
   validation inside them (the stop's runs after the last one is timed), in a temporary directory (after
   ``--``, the flags the benchmark sets itself are refused: ``--iterations``, ``--warm-start``,
   ``--checkpoint-every``, ``--output-dir``, ``--resume``, ``--from-checkpoint``, ``--overwrite``).
   Episodes/s is over the iterations after the first (which includes start-up), from Tune's
   ``progress.csv``: an episode (one image's pass)
   takes an env step per pruning point and acting agent (``envs.pruning_env.env_steps_per_episode``), each
   of which carries ``images_per_env`` episodes. With ``--rollouts-per-image K`` an image runs K episodes
   side by side; the ratio counts episodes, and the distinct images/s (a K-th of them) are printed beside
   it. The run has the whole machine (Ray's processes share its cores).
2. Inference: the policy that run wrote, as ``PrunedViT`` in exact mode, over ``--images`` validation
   images in batches of ``--batch-size`` (median of ``--repeats`` passes after a warm-up), in this process
   with torch's default threads, once training has ended and Ray's processes have exited.

Run from the repository root (Ray writes under ``$HOME``); it takes a few minutes on a 2-core CPU::

    HOME=$(mktemp -d) python -m benchmarks.train_throughput --data-dir ../shared/data
    HOME=$(mktemp -d) python -m benchmarks.train_throughput --data-dir ../shared/data -- --num-workers 2
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import train
from benchmarks import DATA_DIR_HELP, benchmark_parser, run_from_command_line
from cli import given_flags, positive_int, versions_line
from envs.errors import UsageError
from envs.problem import PruningProblem, flag_name
from envs.pruning_env import env_steps_per_episode
from envs.vit.data import load_split
from envs.vit.device import cpu_model
from envs.vit.timing import images_per_second
from policies.checkpoints import latest_checkpoint, read_checkpoint_info
from policies.pruned_vit import PrunedViT


def training_episodes_per_second(trial_dir: Path, problem: PruningProblem) -> tuple[float, int]:
    """Episodes (image passes) sampled per second of iteration time (RLlib's ``time_this_iter_s``: sampling,
    learning and weight sync), over the iterations after the first; returns the rate and the iterations it
    covers."""
    with (trial_dir / "progress.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]
    env_steps = sum(float(row["env_runners/num_env_steps_sampled"]) for row in rows)
    seconds = sum(float(row["time_this_iter_s"]) for row in rows)
    return env_steps * problem.images_per_env / env_steps_per_episode(problem) / seconds, len(rows)


SET_BY_THE_BENCHMARK = ("iterations", "problem.warm_start", "problem.warm_start_images", "problem.warm_start_steps",
                        "problem.checkpoint_every", "output_dir", "resume", "from_checkpoint", "overwrite")
"""The destinations of train.py's flags that the benchmark sets itself (a new run of ``--iterations``
iterations, no warm start, validated once at the stop, in a temporary directory removed afterwards), so that a
user's own after ``--`` would be overridden or would make no sense: refused (:func:`check_train_flags`)."""


def check_train_flags(train_flags: list[str], data_dir: str | None) -> None:
    """A :class:`UsageError`, before anything runs, for ``train_flags`` that do not parse as train.py's, and for
    those the benchmark would override unsaid, since its own come after them: a flag of :data:`SET_BY_THE_BENCHMARK`,
    or a ``--data-dir`` beside the benchmark's own (``data_dir``)."""
    parser = train.build_parser()
    parser.parse_args(train_flags)  # a bad train.py flag is its one error line now, not after Ray has started
    given = given_flags(parser, train_flags)
    overridden = [dest for dest in SET_BY_THE_BENCHMARK if dest in given]
    if overridden:
        raise UsageError(f"{', '.join(map(flag_name, overridden))} after --: the benchmark sets "
                         f"{'it' if len(overridden) == 1 else 'them'} itself (a new run of its own --iterations, "
                         f"given before --, with no warm start, validated once at the stop, in a temporary directory "
                         f"it removes)")
    if data_dir is not None and "problem.data_dir" in given:
        raise UsageError("--data-dir is given before and after --: give it once")


RAY_PROCESSES = "^ray::|/raylet|/gcs_server"
"""``pgrep -f`` pattern of Ray's worker, raylet and GCS processes."""


def wait_for_ray_to_exit(timeout_s: float = 60.0) -> bool:
    """Wait until no Ray process of this user runs on this machine (they exit some seconds after
    ``ray.shutdown``, and inference timed among them reads up to a third low); False if some still run after
    ``timeout_s``, or if there is no ``pgrep`` to tell."""
    if shutil.which("pgrep") is None:
        return False
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", RAY_PROCESSES], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument("--iterations", type=positive_int, default=4,
                        help="PPO iterations to run, at least 2: the first, which includes start-up, is not timed")
    parser.add_argument("--images", type=positive_int, default=1024, help="validation images for the inference pass")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per pruned-inference forward")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed passes over the images (their median is reported)")
    parser.add_argument("train_flags", nargs="*", metavar="-- TRAIN_FLAGS",
                        help="train.py settings to time instead of its defaults, after '--' (e.g. -- --num-workers 2)")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be at least 2: the first iteration, which includes start-up, is not timed")
    check_train_flags(args.train_flags, args.data_dir)
    with tempfile.TemporaryDirectory(prefix="train_throughput_", ignore_cleanup_errors=True) as scratch:
        return measure(args, Path(scratch) / "run")


def measure(args: argparse.Namespace, output: Path) -> int:
    """Train into ``output`` as ``args`` say, then print the training and the pruned inference images/s."""
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    code = train.main([*data, *args.train_flags, "--iterations", str(args.iterations), "--warm-start", "none",
                       "--checkpoint-every", str(args.iterations + 1),  # validated once, at the stop
                       "--output-dir", str(output)])
    if code != 0:
        return code
    if not wait_for_ray_to_exit():
        print("note: Ray's processes may still run on this machine; the inference figure may share the CPU with "
              "them")
    checkpoint = latest_checkpoint(output)
    problem = read_checkpoint_info(checkpoint).problem
    train_rate, timed = training_episodes_per_second(checkpoint.parent, problem)

    model = PrunedViT.from_checkpoint(checkpoint)
    split = load_split(problem.dataset, "val", problem.data_dir, input_size=model.backbone_config["input_size"],
                       val_size=problem.val_size, seed=problem.split_seed, limit=args.images)
    images = model.normalize(split.images)
    infer_rate = images_per_second(model, images, args.batch_size, args.repeats)

    print(f"\nmachine: {cpu_model()}, torch threads {torch.get_num_threads()}; "
          f"{versions_line()}")
    settings = " ".join(args.train_flags) or "train.py defaults"
    rollouts = problem.rollouts_per_image
    distinct = f" ({train_rate / rollouts:.1f} distinct images/s, {rollouts} rollouts each)" if rollouts > 1 else ""
    print(f"training ({settings}, {timed} iterations timed): {train_rate:8.1f} episodes/s{distinct}")
    print(f"pruned inference (MARL exact, batch {args.batch_size}, {len(images)} val images): "
          f"{infer_rate:8.1f} images/s")
    print(f"ratio training / inference: {train_rate / infer_rate:.3f}")
    return 0


if __name__ == "__main__":
    run_from_command_line(main)
