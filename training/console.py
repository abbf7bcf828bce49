"""What a run prints and logs: a line per iteration, ``progress.csv`` with every metric, and the closing lines
(each trial's best checkpoint, and the command that goes on with an interrupted run); and the stop, with one
error line, of a run that met an unreadable image (:class:`StopOnDataError`) or filled its disk
(:class:`StopOnFullDisk`)."""

from __future__ import annotations

import csv
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import EVALUATION_RESULTS
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE, TIMESTAMP
from ray.tune.utils import flatten_dict

from cli import script_words
from envs.atomic_file import replaced_atomically
from envs.errors import one_line
from envs.problem import PruningProblem
from envs.vit.data import DataError
from envs.vit_server import ask_for_data_errors, data_error_among, remote_cause
from policies.checkpoints import validation_rank
from training.run_directory import check_space_after_failure, local_run_dir, local_trial_dir, scored_checkpoints
from training.trial import reached_iteration


def progress_line(result: dict[str, Any], problem: PruningProblem) -> str:
    """One compact line per iteration: the rollouts sampled so far (an env episode carries ``images_per_env``, each
    image's ``rollouts_per_image`` among them), returns per image (an env episode carries several images), left out
    with the ``rollouts`` baseline, against which they average 0 by construction (against a heuristic they are
    above 0 where the agents beat it); ``remaining``: time until --iterations or --time-budget ends the trial,
    whichever comes first."""
    runners = result.get("env_runners", {})
    returns = {} if problem.reward_baseline == "rollouts" else runners.get("module_episode_returns_mean", {})
    progress = result["progress"]
    episodes = ([f"agree {100 * runners['agree']:5.1f}%", f"acc {100 * runners['correct']:5.1f}%",
                 f"kept {runners['keep_ratio']:.3f}",
                 f"GFLOPs {runners['gflops']:.4f} w/o policies"]  # evaluate.py's count them
                if math.isfinite(runners.get("agree", math.nan))  # nan: none finished in the metrics' window
                else ["no episode finished yet"])  # a short first iteration's batch
    parts = [f"iter {result['training_iteration']:4d}",
             f"rollouts {int(runners.get('num_episodes_lifetime', 0)) * problem.images_per_env:>7}",
             *(f"R/img[{m[:3]}]={v / problem.images_per_env:+.3f}" for m, v in sorted(returns.items())),
             *episodes,
             f"{duration(progress['elapsed_s']):>6} elapsed, {duration(progress['remaining_s']):>6} left"]
    if progress["validated"]:  # results carry the last validation along; show it only where it ran
        val = result.get(EVALUATION_RESULTS, {})
        parts.append(f"| val exact {val.get('exact_accuracy', float('nan')):.2f}% "
                     f"(agree {val.get('exact_agreement', float('nan')):.2f}%)")
    if progress["out_of_time"]:
        parts.append("| time budget reached")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``125`` -> ``2m05s``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class ProgressLines(tune.Callback):
    """The console: one :func:`progress_line` per trial iteration, led by the trial's name when there are
    several (Tune's own reporter is off: ``RunConfig(verbose=0)``)."""

    @override(tune.Callback)
    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        problem = PruningProblem.from_json(trial.config["trial"]["problem"])
        name = f"[{trial.config['trial']['name']}] " if len(trials) > 1 else ""
        print(name + progress_line(result, problem), flush=True)


class RunStoppedOnUnreadableImage(DataError):
    """The run stopped on an image a ViT server could not read (:class:`StopOnDataError`): the trials'
    checkpoints stay, and ``--resume`` goes on once the image reads."""


class StopOnDataError(tune.Callback):
    """Ends the run with the first image a ViT server could not read: a split that streams from its files meets
    a damaged image only when an episode draws it, and RLlib would reset the failed env again and again. The
    servers of the run's trials are asked every ``every_s`` seconds (:func:`envs.vit_server.ask_for_data_errors`)
    and their answers read when they have arrived, so Tune's loop, which the trials wait for after each report,
    never waits for them. :class:`RunStoppedOnUnreadableImage` leaves ``Tuner.fit`` after Tune has stopped the
    trials; their checkpoints stay."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._asked, self._answers = -math.inf, []

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into tuner.pkl: no answers, no clock (this
        return {"every_s": self.every_s}  # state is what the runs' tuner.pkl hold, which --resume unpickles)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["every_s"])

    @override(tune.Callback)
    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        if self._answers:
            arrived, self._answers = ray.wait(self._answers, num_returns=len(self._answers), timeout=0)
            error = data_error_among(arrived)
            if error is not None:
                raise RunStoppedOnUnreadableImage(error)
        if time.monotonic() - self._asked >= self.every_s:  # a server that has not answered yet is asked again
            self._answers = ask_for_data_errors([trial.trial_id for trial in trials])
            self._asked = time.monotonic()


class StopOnFullDisk(tune.Callback):
    """Ends the run when a trial fails with its directory's disk (nearly) full (:func:`check_space_after_failure`):
    Tune would restart the trial from its latest checkpoint (``--max-failures``) only to fail again, each restart
    leaving what it could write of Tune's records and a checkpoint behind."""

    @override(tune.Callback)
    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        check_space_after_failure(Path(trial.path).parent, f"trial {trial} failed")  # the run's directory, where local

    on_trial_error = on_trial_recover


class ProgressCsv(CSVLoggerCallback):
    """Tune's ``progress.csv`` with a column for every metric any row reports. Tune's own logger takes the first
    row's columns and drops the others, so validation (not in iteration 1's row) and the episode metrics of an
    iteration that finished no episode would never become columns, and on a resume it writes the new run's
    columns under the old header, which pandas cannot read. Here a row that brings new metrics rewrites the file
    under the union of the columns (rarely: new metrics appear in the first few rows), the earlier rows blank in
    them."""

    @override(CSVLoggerCallback)
    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        if trial not in self._trial_files:
            self._setup_trial(trial)
        row = flatten_dict({key: value for key, value in result.items() if key != "config"}, delimiter="/")
        path = Path(trial.local_path, EXPR_PROGRESS_FILE)
        writer = self._trial_csv[trial]
        if writer is None or not set(row) <= set(writer.fieldnames):
            with path.open(newline="") as existing:
                reader = csv.DictReader(existing)
                earlier, columns = list(reader), list(reader.fieldnames or [])
            columns += [key for key in row if key not in columns]
            self._trial_files[trial].close()
            with replaced_atomically(path) as staging, staging.open("w", newline="") as rewritten:
                copier = csv.DictWriter(rewritten, columns, extrasaction="ignore")
                copier.writeheader()
                copier.writerows(earlier)
            self._trial_files[trial] = path.open("a", newline="")
            writer = self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], columns)
        writer.writerow(row)
        self._trial_files[trial].flush()


def closing_lines(results: tune.ResultGrid, output_dir: str,
                  data_dir: str | None = None) -> tuple[list[str], list[str]]:
    """For each trial, its best checkpoint by validation score among those still stored
    (:func:`~training.run_directory.scored_checkpoints`), and the command that evaluates it on ``data_dir`` (the
    ``--data-dir`` this command gave a resumed run; else the one the trial records); and one line per trial that
    failed."""
    lines, errors = [], []
    several = len(results) > 1
    run_dir = local_run_dir(output_dir)
    evaluate = shlex.join(script_words("evaluate.py"))
    for result in results:
        name = (f"[{result.config['trial']['name'] if result.config else Path(result.path or 'trial').name}] "
                if several else "")
        if result.config is None and result.error is None:  # a trial that never started (the run was stopped)
            lines.append(f"{name}not started: --resume starts it")
            continue
        if result.error is not None:  # also before its config reached Tune: its trainable did not load
            cause = remote_cause(result.error)
            message = one_line(cause) or "no details"
            errors.append(f"{name}trial failed: {type(cause).__name__}: {message[:500]} (traceback: "
                          f"{result.path}/error.txt)")
            continue
        scored = scored_checkpoints(result, run_dir)
        if not scored:  # stopped before its first validation
            lines.append(f"{name}no checkpoint yet (the first comes with the first validation, --checkpoint-every): "
                         f"--resume starts this trial again")
            continue
        checkpoint, score, iteration = max(scored, key=lambda entry: validation_rank(entry[1], entry[2]))
        trial_and_checkpoint = Path(Path(result.path).name, checkpoint)
        problem = PruningProblem.from_json(result.config["trial"]["problem"])
        trial_data_dir = data_dir or problem.data_dir
        ranking_images = min(problem.val_limit, problem.val_size)  # what the validation server holds
        best = (f"(best on validation: iteration {iteration}, exact-budget accuracy {score:.2f}% on the "
                f"{ranking_images} images that ranked the checkpoints: expect less on others)")
        if run_dir is None:
            lines.append(f"{name}best checkpoint: {output_dir.rstrip('/')}/{trial_and_checkpoint} {best}\n"
                         f"{name}evaluate a local copy of it: {evaluate} --checkpoint <copy> "
                         f"--data-dir {shlex.quote(trial_data_dir)}")
            continue
        path = run_dir / trial_and_checkpoint
        shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
        lines.append(f"{name}best checkpoint: {shown} {best}\n"
                     f"{name}evaluate it: {evaluate} --checkpoint {shlex.quote(shown)} --data-dir "
                     f"{shlex.quote(trial_data_dir)}")
    return lines, errors


def run_interrupted(results: tune.ResultGrid, iterations: int, output_dir: str, started: float) -> bool:
    """Whether a trial stopped before its stop rule without an error: the run was interrupted (Ctrl-C), and
    ``--resume`` goes on with it. A trial reached the iteration of its last report or, on a local disk, of its
    newest checkpoint (:func:`~training.trial.reached_iteration`): a trial resumed at its stop reports nothing,
    nor does one whose last checkpoint was stored before a Ctrl-C kept the iteration from being reported. In
    cloud storage Tune records a checkpoint only with a report, so the last report's iteration is the latest.
    The time budget counts from each command's start (:class:`~training.trial.StopRule`): a report that reached
    it ends the trial only when it was made after this command ``started`` (Tune stamps a report with the time
    in whole seconds), not the one a --resume carries along from the command before until its first report."""
    run_dir = local_run_dir(output_dir)
    for result in results:
        if result.error is not None:
            continue
        if result.config is None:
            return True
        metrics = result.metrics or {}
        on_disk = reached_iteration(local_trial_dir(run_dir, result)) if run_dir is not None else 0
        reached = max(metrics.get("training_iteration", 0), on_disk)
        out_of_time = metrics.get("progress", {}).get("out_of_time") and metrics.get(TIMESTAMP, 0) >= int(started)
        if reached < iterations and not out_of_time:
            return True
    return False

