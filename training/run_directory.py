"""A run's directory: where Tune stores it, the lock that keeps a second train.py out, what ``--overwrite``
deletes, and the checkpoints stored there."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow
import pyarrow.fs
from ray import tune

from envs.atomic_file import first_missing
from envs.errors import UsageError, UserError
from policies.checkpoints import (
    CHECKPOINT_PREFIX,
    PRUNING_CONFIG,
    UNRECORDED_PREFIX,
    PolicyCheckpointError,
    check_restorable,
    incomplete_checkpoints,
    readable_checkpoint_info,
    trial_checkpoints,
    trial_directories,
    validated_checkpoints,
)
from training.trial import SCORE


def storage_location(output_dir: str) -> tuple[str, str]:
    """``--output-dir`` as Tune's ``(storage_path, name)``: a cloud URI as it is, a local path made absolute."""
    if "://" in output_dir:
        parent, _, name = output_dir.rstrip("/").rpartition("/")
        return parent, name
    path = Path(output_dir).expanduser().resolve()
    return str(path.parent), path.name


def tune_run_path(output_dir: str) -> str:
    """``--output-dir`` as the path of the run that Tune restores and reads (``Tuner.restore``,
    ``ExperimentAnalysis``): :func:`storage_location`'s two parts joined."""
    return "/".join(storage_location(output_dir))


def check_storage_uri(output_dir: str) -> None:
    """Refuse, before the data is read, a cloud ``--output-dir`` that pyarrow cannot open, as Tune opens it (an
    unknown scheme, HDFS without Java); for S3 this may ask the bucket's region. The error's first line is kept:
    HDFS's lists every place it looked for Java."""
    try:
        pyarrow.fs.FileSystem.from_uri(output_dir)
    except (pyarrow.ArrowException, ValueError, OSError) as error:
        raise UsageError(f"--output-dir {output_dir}: {(str(error) or type(error).__name__).splitlines()[0]}") from None


def local_run_dir(output_dir: str) -> Path | None:
    """The run's directory when ``--output-dir`` is a path on this machine (or a disk its nodes share), where
    Tune stores each trial's files in ``<run>/<trial name>``; None for a cloud URI."""
    storage_path, name = storage_location(output_dir)
    return None if "://" in storage_path else Path(storage_path, name)


def local_trial_dir(run_dir: Path, result: tune.Result) -> Path:
    """The directory in which the trial of ``result`` (Tune's, from ``Tuner.fit``) keeps its files in the run's
    local directory ``run_dir`` (:func:`local_run_dir`): ``<run>/<trial name>``."""
    return run_dir / Path(result.path).name


def _lock(descriptor: int, run_dir: Path) -> None:
    """Take the lock of ``run_dir`` (open as ``descriptor``), or a UsageError where another train.py holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another train.py is running in {run_dir}: wait for it to end, or pass another "
                         f"--output-dir") from None


def check_not_running(run_dir: Path) -> None:
    """A UsageError where another train.py holds the lock of ``run_dir`` (:func:`run_lock`): checked first, so
    that what it has not written yet (a run to resume, say) is not taken for missing."""
    if not run_dir.is_dir():
        return
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        _lock(descriptor, run_dir)
    finally:
        os.close(descriptor)  # and with it this check's lock


@contextlib.contextmanager
def run_lock(run_dir: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on a local run's directory while this process reads its inputs and trains in it,
    so that a second train.py on the same ``--output-dir`` is refused at once instead of mixing its checkpoints
    into the run's. The lock goes with the process, however it ends. The directories made for it are removed
    again if the run fails or is interrupted before anything is written in them. A cloud ``--output-dir``
    (None) is not locked."""
    if run_dir is None:
        yield
        return
    made = first_missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        _lock(descriptor, run_dir)
        yield
    except BaseException:  # an error or an interrupt (KeyboardInterrupt)
        if made is not None and not any(run_dir.iterdir()):
            shutil.rmtree(made)  # only the empty directories made above
        raise
    finally:
        os.close(descriptor)


TUNER_RECORD = "tuner.pkl"
"""Tune's record of how a run was set up (its Tuner pickled: run config, callbacks), which ``--resume`` reads."""


EXPERIMENT_STATE = "experiment_state-*.json"
"""Tune's record of a run's trials, written from the start of its loop: without one, no trial has started."""


RUN_FILES = (TUNER_RECORD, "trainable.pkl", ".validate_storage_marker", EXPERIMENT_STATE, "basic-variant-state-*.json")
"""What Tune writes at the top of a run directory, beside a directory per trial."""


TRIAL_RECORD = "params.json"
"""Tune's record of a trial's config, written as the trial starts: what marks a directory as one of Tune's trials."""


TRIAL_FILES = (TRIAL_RECORD, "params.pkl", "progress.csv", "result.json", "events.out.tfevents.*", "error.txt",
               "error.pkl", f"{CHECKPOINT_PREFIX}*", f"{UNRECORDED_PREFIX}{CHECKPOINT_PREFIX}*", "warm_start")
"""What a trial's directory holds: Tune's records and loggers, its checkpoints and the warm start's modules."""


FULL_DISK_MIB = 64
"""Free space below which a run that failed is taken to have failed for it (a checkpoint of the reference
policy takes about 1 MiB, Tune's records less)."""


class RunStorageFull(UserError, OSError):
    """The disk of a run's directory filled up while it trained; the message says how to go on."""


def check_space_after_failure(run_dir: Path | None, cause: str) -> None:
    """Where a failure (``cause``, for the message) ended a run whose local directory's disk is (nearly) full, a
    :class:`RunStorageFull` that says so and how to go on, instead of what failed to write (Tune's own records fail
    in ways that do not say it: a half-written pickle, say)."""
    if run_dir is None or not run_dir.exists():
        return
    free_mib = shutil.disk_usage(run_dir).free / 2**20
    if free_mib < FULL_DISK_MIB:
        raise RunStorageFull(f"the disk of {run_dir} is full ({free_mib:.1f} MiB free) and the run stopped "
                             f"({' '.join(cause.split())}): free space, then go on with --resume (where the run's "
                             f"records did not survive it, --resume names the checkpoints to start a new run from)")


def newest_complete_checkpoints(run_dir: Path) -> list[Path]:
    """Each trial's newest checkpoint that reads and would restore (``check_restorable``): where a run's Tune
    records do not read (a full disk, say, cut them and the checkpoint being copied short), what a new run can
    start from."""
    newest = []
    for trial in trial_directories(run_dir):
        for checkpoint in reversed(trial_checkpoints(trial)):
            if readable_checkpoint_info(checkpoint) is None:  # read before the pickles check_restorable opens
                continue
            try:
                check_restorable(checkpoint)
            except PolicyCheckpointError:
                continue
            newest.append(checkpoint)
            break
    return newest


def check_resumable(trial_dir: Path) -> None:
    """Warn, in one line, of the checkpoint directories of a trial that ``--resume`` passes over for want of their
    ``pruning_config.json`` (:func:`~policies.checkpoints.incomplete_checkpoints`), naming the checkpoint it goes
    on from instead: a newest checkpoint cut short while it was stored makes the trial go back to an older one,
    its iterations since then lost, which the ``resumed from`` line would say only by the checkpoint's name. A
    :class:`UsageError` where the trial has checkpoint directories and none complete: it would start again
    from its beginning."""
    passed_over = incomplete_checkpoints(trial_dir)
    if not passed_over:
        return
    one = len(passed_over) == 1
    lacking = (f"{', '.join(path.name for path in passed_over)} {'has' if one else 'have'} no {PRUNING_CONFIG} "
               f"(cut short while {'it was' if one else 'they were'} stored?)")
    complete = trial_checkpoints(trial_dir)
    if not complete:
        raise UsageError(f"--resume: no checkpoint of the trial in {trial_dir} is complete: {lacking}; delete "
                         f"{'it' if one else 'them'} to start the trial again from its beginning, or start a new run "
                         f"with --overwrite")
    info = readable_checkpoint_info(complete[-1])
    at = f" (iteration {info.iteration})" if info is not None and info.iteration is not None else ""
    warnings.warn(f"--resume: in {trial_dir}, {lacking} and {'is' if one else 'are'} passed over: the trial goes on "
                  f"from {complete[-1].name}{at}", stacklevel=2)


def delete_run(run_dir: Path) -> None:
    """``--overwrite``: delete what the run in ``run_dir`` wrote (:data:`RUN_FILES`, and :data:`TRIAL_FILES` in
    its trials' directories, those holding a :data:`TRIAL_RECORD`), and say what else is kept there. Only the
    directories Tune made count as trials, unlike :func:`~policies.checkpoints.trial_directories`, which reads every
    directory: a directory of one's own beside them keeps what it holds."""
    trials = [path.parent for path in run_dir.glob(f"*/{TRIAL_RECORD}")]
    for directory, patterns in ((run_dir, RUN_FILES), *((trial, TRIAL_FILES) for trial in trials)):
        for path in {match for pattern in patterns for match in directory.glob(pattern)}:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for trial in trials:
        with contextlib.suppress(OSError):  # kept: it holds files of one's own
            trial.rmdir()
    kept = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if not path.is_dir())
    if kept:
        print(f"--overwrite deleted the run in {run_dir} and kept what is not the run's: {', '.join(kept[:5])}"
              + (f" and {len(kept) - 5} more" if len(kept) > 5 else ""), flush=True)


def stored(checkpoint: tune.Checkpoint) -> bool:
    """Whether ``checkpoint`` is still in its storage, local or cloud: after a SIGKILL and --resume, Tune's
    record of a run can name one the killed run's rotation deleted."""
    return checkpoint.filesystem.get_file_info(checkpoint.path).type != pyarrow.fs.FileType.NotFound


def scored_checkpoints(result: tune.Result, run_dir: Path | None) -> list[tuple[str, float, int | None]]:
    """A trial's checkpoints still stored, as ``(name, validation score, iteration)``, those never validated left
    out. On a local disk, every complete checkpoint there, with what it records: those Tune has no record of
    too (set aside on a resume, or stored in an iteration that a Ctrl-C kept from being reported). In cloud
    storage, what Tune recorded with each, so that nothing is downloaded: its ranked checkpoints and the last
    report's, which Tune keeps whatever its score (the stop writes one)."""
    if run_dir is not None:
        return [(path.name, info.val_score, info.iteration)
                for path, info in validated_checkpoints(trial_checkpoints(local_trial_dir(run_dir, result)))]
    latest = [(result.checkpoint, result.metrics)] if result.checkpoint is not None else []
    return [(Path(checkpoint.path).name, metrics[SCORE], metrics.get("training_iteration"))
            for checkpoint, metrics in [*result.best_checkpoints, *latest]
            if metrics.get(SCORE) is not None and stored(checkpoint)]
