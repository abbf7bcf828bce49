"""Train the attention and similarity agents with RLlib PPO (new API stack), run by Ray Tune.

    python train.py --data-dir ../shared/data                    # default run: 18 min of training
    python train.py --target-ratio 0.3,0.5,0.7                   # a sweep: one trial per budget
    python train.py --num-workers 4 --time-budget 0 --iterations 2000   # longer, more env runners
    python train.py --address auto --num-workers 16 --output-dir s3://bucket/runs/marl   # a Ray cluster
    python train.py --output-dir runs/marl --resume              # continue every trial of a run

Each trial is one PPO run on one pruning problem, with its own ViT servers; a number setting given several
comma-separated values (``--target-ratio 0.3,0.5``) makes one trial per combination, run in parallel when
the cluster has room. Sampling uses the ``train`` split; every ``--checkpoint-every`` iterations and at the
end the policies are scored in the mode evaluate.py reports as ``MARL exact`` on a fixed subset of the
``val`` split, and a checkpoint is written; Tune keeps the best ``--keep-checkpoints`` by the
exact-budget accuracy (and the latest), retries a failed trial from its latest checkpoint, and logs every
result (``progress.csv``, ``result.json``, TensorBoard) in the trial's directory under ``--output-dir``.
It ends naming each trial's best checkpoint and the command that evaluates it. The test split is never read
here. ``python train.py --help`` lists every setting of the pruning problem (``envs/problem.py``) with its doc.

What to expect from the default run on a 2-core CPU: 90-220 PPO iterations in its 18 minutes (146-222 in the
ten quick starts recorded in benchmarks/README.md; the machines here differ by up to 2x), and an exact-budget
validation accuracy of 82-84% on its 1,000 validation images at every checkpoint, level with the heuristics
(greedy similarity 82.7%, Distinctive NMS 82.9%): PPO has not yet learned to beat them (README, "Results", and
docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.error import TuneError

from cli import (
    OneLineParser,
    add_data_access_arguments,
    already_holds_a_run,
    check_output_dir,
    code_commit,
    data_access,
    duration_in,
    home_expanded,
    interrupted_go_on_line,
    non_negative_int,
    output_directory,
    positive_int,
    resume_command,
    resume_conflict,
    run_command_line,
    signal_handlers_restored,
)
from envs.errors import UsageError, UserError
from envs.problem import (
    PruningProblem,
    add_problem_arguments,
    flag_name,
    problems_from_args,
    spelled_points,
    sweep_label,
)
from envs.vit.backbone_checkpoint import RUN_EXPORT_DIR, is_backbone_checkpoint, weights_digest
from envs.vit.data import DataError, absolute_data_dir, check_recorded_data_dir
from envs.vit.staged_vit import PrunePointsError
from envs.vit_server import (
    ServerInputs,
    load_server_inputs,
    staged_from_weights,
)
from policies.checkpoints import (
    check_policies,
    check_restorable,
    is_policy_checkpoint,
    load_rllib_policies,
    read_checkpoint_info,
)
from training.console import (
    ProgressCsv,
    ProgressLines,
    RunStoppedOnUnreadableImage,
    StopOnDataError,
    StopOnFullDisk,
    closing_lines,
    run_interrupted,
)
from training.placement import TrialResources, plan_placement, server_callers, trial_resources
from training.ray_session import (
    RUN_SIGNALS,
    check_cluster_answers,
    cluster_shortfall,
    interrupt_on_sigterm,
    quiet_ray_loggers,
    start_ray,
)
from training.run_directory import (
    EXPERIMENT_STATE,
    TRIAL_RECORD,
    TUNER_RECORD,
    check_not_running,
    check_resumable,
    check_space_after_failure,
    check_storage_uri,
    delete_run,
    local_run_dir,
    newest_complete_checkpoints,
    run_lock,
    storage_location,
    tune_run_path,
)
from training.trial import SCORE, TRAIN_SERVER, StopRule, reached_iteration, run_trial, server_settings


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--num-workers", type=non_negative_int, default=2,
                     help="env runners per trial (0 = sample in the trial's own process, for debugging; default: 2)")
    run.add_argument("--envs-per-worker", type=positive_int, default=1,
                     help="pruning envs each env runner steps in one batch (default: 1)")
    run.add_argument("--sample-ahead", action=argparse.BooleanOptionalAction, default=True,
                     help="the env runners sample the next batch while the learner updates on this one, with the "
                          "policy of one update earlier (PPO's ratio is to the policy that sampled); "
                          "--no-sample-ahead: RLlib's PPO, which alternates the two")
    run.add_argument("--iterations", type=positive_int, default=1000,
                     help="stop a trial after this many iterations in total (default: 1000; raise it on --resume to go "
                          "on)")
    run.add_argument("--time-budget", type=duration_in("m"), default=18.0, metavar="MINUTES",
                     help="stop a trial (with a checkpoint) after the iteration that passes this much training "
                          "time since it (re)started, in minutes or with a unit (90s, 1.5h); 0 = no limit "
                          "(default: 18, so the default run fits in ~20 min)")
    run.add_argument("--output-dir", type=output_directory, default="runs/marl",
                     help="the run's directory, local or a cloud URI (s3://, gs://): a cluster needs no shared disk "
                          "(default: runs/marl)")
    run.add_argument("--keep-checkpoints", type=positive_int, default=3,
                     help="checkpoints kept per trial: the best by validation score, and always the latest "
                          "(default: 3)")
    run.add_argument("--max-failures", type=non_negative_int, default=2,
                     help="times a failed trial is restarted from its latest checkpoint (default: 2)")
    run.add_argument("--resume", action="store_true",
                     help="continue every trial of the run in --output-dir from its latest checkpoint, with its "
                          "problem and resources; --iterations and --time-budget are taken from this command")
    run.add_argument("--from-checkpoint", type=home_expanded, default=None, metavar="CHECKPOINT",
                     help="start a new run from a checkpoint: its problem and PPO settings, weights, optimiser "
                          "state and iteration count (e.g. to go on with more env runners)")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir holds a run")
    run.add_argument("--address", default=None, help="join a Ray cluster (e.g. 'auto'); default: start a local one")
    run.add_argument("--num-cpus", type=positive_int, default=None,
                     help="CPUs of a local Ray instance (default: this machine's; raised to what one trial "
                          "reserves)")
    run.add_argument("--servers", type=positive_int, default=None,
                     help="ViT servers per trial, the env runners spread over them by index (default: one per "
                          "GPU of the cluster up to one per env runner, one without GPUs)")
    run.add_argument("--server-threads", type=positive_int, default=1,
                     help="torch threads of each ViT server, and the CPUs it reserves (default: 1)")
    add_data_access_arguments(run)
    add_problem_arguments(p, "pruning problem (comma-separated numbers sweep; taken from the run on --resume "
                             "and from the checkpoint with --from-checkpoint, --data-dir aside)")
    # Every problem and PPO flag defaults to None, "not given" (add_problem_arguments), so that with_data_dir
    # overrides a run's data directory only if given, and with_backbone_data takes the backbone's data set and
    # held-out split unless given. (Which flags --resume and --from-checkpoint refuse comes from
    # cli.given_flags, which also sees a flag given with its default value: --from-checkpoint refuses every
    # problem and PPO flag given, --resume those given with another value than the run's.)
    return p


RECORDED_RUN_FLAGS: dict[str, Callable[[TrialResources, Mapping[str, Any]], Any]] = {
    "num_workers": lambda resources, tuner: resources.num_workers,
    "envs_per_worker": lambda resources, tuner: resources.envs_per_worker,
    "sample_ahead": lambda resources, tuner: resources.sample_ahead,
    "servers": lambda resources, tuner: resources.placement.servers,
    "server_threads": lambda resources, tuner: resources.placement.server_cpus,
    "keep_checkpoints": lambda resources, tuner: tuner["_run_config"].checkpoint_config.num_to_keep,
    "max_failures": lambda resources, tuner: tuner["_run_config"].failure_config.max_failures,
}
"""The run flags a run records and ``--resume`` keeps, with where the record holds each: the trials' resources,
and Tune's checkpoint and failure settings in its ``tuner.pkl``."""


FLAGS_READ_ON_RESUME = ("address", "num_cpus", "problem.data_dir", "download", "memory_budget_mb", "iterations",
                        "time_budget")
"""The flags a resumed run takes from its own command line: where Ray runs, where and how the data is read (the
run records the data directory it started with, for a run moved to another machine), and when it stops."""


def go_on_command(args: argparse.Namespace, given: Collection[str]) -> str:
    """The command that goes on with an interrupted run: ``--resume`` with the :data:`FLAGS_READ_ON_RESUME` given
    to this one (``given``: the flags the command line named)."""
    return resume_command("train.py", build_parser(), args, [dest for dest in FLAGS_READ_ON_RESUME if dest in given])


def flags_kept_on(given: Collection[str], resume: bool) -> list[str]:
    """Of the flags ``given`` on the command line (their destinations), those that ``--resume`` (``resume``) or
    ``--from-checkpoint`` take from the run or the checkpoint instead: every problem and PPO flag but
    ``--data-dir`` (where the data is, not what the agents learn), and on ``--resume`` the
    :data:`RECORDED_RUN_FLAGS`."""
    return sorted(dest for dest in given if (dest.startswith(("problem.", "ppo.")) and dest != "problem.data_dir")
                  or (resume and dest in RECORDED_RUN_FLAGS))


def flags_changed_on_resume(kept: Collection[str], args: argparse.Namespace, problems: list[PruningProblem],
                            resources: TrialResources, tuner: Mapping[str, Any] | None) -> dict[str, str]:
    """Of the ``kept`` flags given with ``--resume`` (:func:`flags_kept_on`), those whose value is not the run's
    own, each with the run's value as a flag would give it: the run's command given again goes on, a change is
    refused rather than ignored. ``problems`` and ``resources``: the run's record; ``tuner``: Tune's record of it
    (its ``tuner.pkl``; None where unread, a run in cloud storage, and then its flags count as changed)."""
    given = problems_from_args(args)
    changed = {}
    for dest in kept:
        if dest in RECORDED_RUN_FLAGS:
            ours = {getattr(args, dest)}
            try:
                theirs = {RECORDED_RUN_FLAGS[dest](resources, tuner)}
            except (KeyError, AttributeError, TypeError):  # no readable record of it
                theirs = set()
        else:
            ours, theirs = ({problem_setting(problem, dest) for problem in group} for group in (given, problems))
        if ours != theirs:
            values = sorted(",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in theirs)
            changed[dest] = ", ".join(values) if values else "unknown"
    return changed


def problem_setting(problem: PruningProblem, dest: str) -> Any:
    """The value of a problem's field or PPO setting by its flag's destination: ``problem.target_ratio``,
    ``ppo.lr``."""
    section, field = dest.split(".")
    return getattr(problem if section == "problem" else problem.ppo, field)


def build_tuner(args: argparse.Namespace, trainable: Callable[[dict], None], problems: list[PruningProblem],
                resources: TrialResources) -> tune.Tuner:
    """A new run of one trial per problem, or with --resume the run in --output-dir restored: every trial,
    finished ones too, goes on from its latest checkpoint with the problem and resources it started with."""
    storage_path, name = storage_location(args.output_dir)
    trainable = tune.with_resources(trainable, trial_resources(resources))
    if args.resume:
        resume = tune.ResumeConfig.ResumeType.RESUME
        return tune.Tuner.restore(tune_run_path(args.output_dir), trainable=trainable,
                                  _resume_config=tune.ResumeConfig(finished=resume, errored=resume))
    trials = [{"name": sweep_label(p, problems), "problem": p.to_json(), "resources": resources.to_json(),
               "from_checkpoint": args.from_checkpoint and str(Path(args.from_checkpoint).resolve())}
              for p in problems]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: trial.config["trial"]["name"]),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=0,
            callbacks=[ProgressLines(), ProgressCsv(), StopOnDataError(), StopOnFullDisk()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=args.keep_checkpoints, checkpoint_score_attribute=SCORE,
                                                    checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=args.max_failures)),
    )


def what_it_holds_instead(output_dir: str) -> str:
    """What to add to an error about an ``--output-dir`` that holds no run when it is a level or two off: a trial of
    the run above it (Tune's ``params.json`` in it), a checkpoint (of a run), or a backbone.py run with its export;
    the paths as given."""
    local = local_run_dir(output_dir)
    if local is None:
        return ""
    shown = Path(output_dir).expanduser()
    if shown.name in ("", ".", ".."):  # no parent to show as given
        shown = local
    if (local / TRIAL_RECORD).is_file() and tune.Tuner.can_restore(str(local.parent)):
        return f" ({shown} is a trial of the run in {shown.parent}: pass --output-dir {shown.parent})"
    if is_policy_checkpoint(local):
        run = shown.parent.parent
        in_run = (f"of the run in {run}: pass --output-dir {run} to resume it, or " if
                  tune.Tuner.can_restore(str(local.parent.parent)) else "")
        return f" ({shown} is a checkpoint {in_run}start a new run from it with --from-checkpoint {shown})"
    if is_backbone_checkpoint(local / RUN_EXPORT_DIR):
        return f" (it holds a backbone.py run: train on its export with --backbone {shown / RUN_EXPORT_DIR})"
    return ""


def planned_trials(args: argparse.Namespace, given: Collection[str]) -> tuple[list[PruningProblem], TrialResources]:
    """The problems and resources of the trials: from the flags (or ``--from-checkpoint``'s problem) for a new
    run, from the run's own record on --resume; a flag ``given`` that either would ignore is refused. The
    placement is this machine's guess until Ray is up."""
    local = local_run_dir(args.output_dir)
    if local is not None:
        check_output_dir(local, args.output_dir)
        check_not_running(local)
    else:
        check_storage_uri(args.output_dir)
    if args.resume and (args.from_checkpoint or args.overwrite):
        other = "--from-checkpoint starts a new one" if args.from_checkpoint else "--overwrite replaces it"
        raise UsageError(resume_conflict(other))
    check_run_flags_take_effect(args, given)
    kept = flags_kept_on(given, args.resume)
    if args.from_checkpoint and kept:
        raise UsageError(f"--from-checkpoint goes on with the checkpoint's problem and its PPO settings: drop "
                         f"{', '.join(flag_name(dest) for dest in kept)}")
    if args.resume:
        return resumed_trials(args, kept, local)
    check_new_run_directory(args, local)
    problems = new_problems(args, given)
    placement = plan_placement(args.servers, args.server_threads, torch.cuda.device_count(), torch.cuda.is_available(),
                               args.num_workers)
    return with_data_dir(problems, args), TrialResources(args.num_workers, args.envs_per_worker, placement,
                                                          args.sample_ahead)


def resumed_trials(args: argparse.Namespace, kept: Collection[str],
                   local: Path | None) -> tuple[list[PruningProblem], TrialResources]:
    """The problems and resources a ``--resume`` goes on with, from the run's Tune records (read now: a damaged
    one is refused before Ray starts); ``kept``: the flags given that must equal the run's (``local``: the run's
    directory on a local disk, None in cloud storage)."""
    run_path = tune_run_path(args.output_dir)
    if not tune.Tuner.can_restore(run_path):
        raise UsageError(f"nothing to resume: no run in {args.output_dir}{what_it_holds_instead(args.output_dir)}")
    tuner = None
    try:  # Tune's records, read by Tuner.restore once Ray is up
        if local is not None:
            with (local / TUNER_RECORD).open("rb") as file:
                tuner = pickle.load(file)
        trials = [trial.config["trial"] for trial in tune.ExperimentAnalysis(run_path).trials]
    except Exception as error:  # noqa: BLE001 - a damaged record fails in many ways
        complete = newest_complete_checkpoints(local) if local is not None else []
        start = (f"start a new run from a trial's newest complete checkpoint ({', '.join(map(str, complete))}) "
                 f"with --from-checkpoint and another --output-dir" if complete else
                 "no complete checkpoint is left to start a new run from")
        raise UsageError(f"the run's Tune records in {args.output_dir} ({TUNER_RECORD}, {EXPERIMENT_STATE}) do "
                         f"not read ({type(error).__name__}: {error}): {start}") from None
    if not trials:  # stopped before Tune made its trials: its records hold the run's start alone
        raise UsageError(f"nothing to resume: the run in {args.output_dir} was stopped before its trials started; "
                         f"run its command again with --overwrite")
    problems = [PruningProblem.from_json(t["problem"]) for t in trials]
    resources = TrialResources.from_json(trials[0]["resources"])
    if changed := flags_changed_on_resume(kept, args, problems, resources, tuner):
        raise UsageError("--resume goes on with the run's problems, PPO settings and resources (--from-checkpoint "
                         "starts a new run that may change them): drop or give the run's value: "
                         + ", ".join(f"{flag_name(dest)} (the run's: {value})" for dest, value in changed.items()))
    for trial in trials if local is not None else []:
        check_resumable(local / trial["name"])
    reached = [reached_iteration(local / trial["name"]) for trial in trials] if local is not None else []
    if reached and min(reached) >= args.iterations:
        raise UsageError(f"every trial of the run is at iteration {min(reached)} or later and --iterations counts "
                         f"them in total: pass more than {max(reached)} to go on")
    problems = with_data_dir(problems, args)
    if getattr(args, "problem.data_dir") is None:
        check_recorded_data_dir(problems[0].data_dir)
    return problems, resources


def check_new_run_directory(args: argparse.Namespace, local: Path | None) -> None:
    """A :class:`UsageError` where a new run's local directory holds something: a run, unless ``--overwrite``
    replaces it, or anything else. A cloud URI that holds a run is refused even with ``--overwrite``, which
    deletes only on a local disk: Tune would write the new run over the old one's checkpoints and records."""
    holds_a_run = tune.Tuner.can_restore(tune_run_path(args.output_dir))  # where the new run would be stored
    if local is None:
        if holds_a_run:
            raise UsageError(already_holds_a_run(args.output_dir, "another --output-dir (--overwrite deletes a run "
                                                                  "on a local disk only)"))
        return
    if local.exists() and any(local.iterdir()):
        if not holds_a_run:
            raise UsageError(f"{args.output_dir} is not empty and holds no run: choose another --output-dir"
                             f"{what_it_holds_instead(args.output_dir)}")
        if not args.overwrite:
            raise UsageError(already_holds_a_run(args.output_dir))


def new_problems(args: argparse.Namespace, given: Collection[str]) -> list[PruningProblem]:
    """A new run's problems: ``--from-checkpoint``'s, or the flags' (one per value of a sweep, each once)."""
    if args.from_checkpoint:
        info = read_checkpoint_info(Path(args.from_checkpoint))
        if info.iteration is not None and args.iterations <= info.iteration:
            raise UsageError(f"--from-checkpoint is at iteration {info.iteration} and --iterations counts them in "
                             f"total: pass more than {info.iteration}")
        check_restorable(args.from_checkpoint)
        return [info.problem]
    problems = with_backbone_data(problems_from_args(args), args)
    labels = [sweep_label(problem, problems) for problem in problems]
    if len(set(problems)) < len(problems):
        raise UsageError("the sweep gives a setting the same value twice: give each value once")
    if len(set(labels)) < len(labels):
        raise UsageError(f"two trials of the sweep would share the name {max(labels, key=labels.count)} (values "
                         f"equal to 6 significant digits): give values that differ more")
    check_settings_take_effect(problems[0], given)
    return problems


def check_settings_take_effect(problem: PruningProblem, given: Collection[str]) -> None:
    """A :class:`UsageError` for a problem flag ``given`` that ``problem`` does not read
    (``PruningProblem.settings_without_effect``): its trials would be twins of runs without it. (What decides it,
    the agents and the warm start, is no number, so one problem of a sweep answers for all.)"""
    unread = problem.settings_without_effect()
    for dest in sorted(given):
        if dest.startswith("problem.") and dest.removeprefix("problem.") in unread:
            raise UsageError(f"{flag_name(dest)} changes nothing here: {unread[dest.removeprefix('problem.')]}")


def check_run_flags_take_effect(args: argparse.Namespace, given: Collection[str]) -> None:
    """A :class:`UsageError` for a run flag ``given`` that the others leave without effect: the CPUs of a local
    Ray instance when joining a cluster, a ViT server no env runner calls, sampling ahead without remote env
    runners to sample."""
    if "num_cpus" in given and args.address:
        raise UsageError(f"--num-cpus sizes a local Ray instance: the cluster at --address {args.address} has its own")
    if args.resume:  # the run's own resources: a flag given again is compared with them (flags_changed_on_resume)
        return
    callers = server_callers(args.num_workers)
    if "servers" in given and args.servers > callers:
        raise UsageError(f"--servers {args.servers}: {args.num_workers} env runner(s) call {callers} ViT server(s) at "
                         f"most; the others would reserve their CPUs or GPUs and serve no one")
    if "sample_ahead" in given and args.sample_ahead and args.num_workers == 0:
        raise UsageError("--sample-ahead samples on the env runners while the learner updates: --num-workers 0 has "
                         "none (it runs RLlib's PPO)")


def with_backbone_data(problems: list[PruningProblem], args: argparse.Namespace) -> list[PruningProblem]:
    """New problems on their backbones' data (``PruningProblem.on_backbone_data``); ``--dataset``, ``--val-size``
    and ``--split-seed`` given on the command line win."""
    given = [name for name in ("dataset", "val_size", "split_seed") if getattr(args, f"problem.{name}") is not None]
    return [problem.on_backbone_data(given) for problem in problems]


def with_data_dir(problems: list[PruningProblem], args: argparse.Namespace) -> list[PruningProblem]:
    """The problems reading their data from an absolute path (trials run in directories of their own): the
    ``--data-dir`` given on the command line, else the one they name, relative to the working directory. A
    run or checkpoint moved to another machine is pointed at its data so; the data directory is no part of
    what the agents learn."""
    return [replace(problem, data_dir=absolute_data_dir(getattr(args, "problem.data_dir") or problem.data_dir))
            for problem in problems]


DATA_SETTINGS = ("backbone", "dataset", "data_dir", "train_limit", "val_size", "split_seed", "val_limit",
                 "prune_points")  # the fields of a problem that decide its servers' weights and images


def read_server_inputs(args: argparse.Namespace, problems: list[PruningProblem],
                       resources: TrialResources) -> dict[str, ServerInputs] | None:
    """The servers' weights and images, read here, so that a bad backbone, data set or ``--from-checkpoint``
    fails before anything starts, and shipped to the trials through Ray's object store when their problems
    differ in no :data:`DATA_SETTINGS` (a sweep of the budget); else None: each trial reads its own."""
    settings = server_settings(problems[0], resources.placement, data_access(args))
    try:
        inputs = {name: load_server_inputs(s) for name, s in settings.items()}
    except PrunePointsError as error:  # the flag's, or the run's or the checkpoint's setting of it
        raise UsageError(f"{flag_name('problem.prune_points')} {spelled_points(problems[0].prune_points)}: "
                         f"{error}") from None
    if args.from_checkpoint:  # a checkpoint of another backbone or feature set fails here, clearly
        patches = staged_from_weights(inputs[TRAIN_SERVER].state, inputs[TRAIN_SERVER].config,
                                      problems[0].prune_points).num_patches
        # RLlib's files, as the run restores from them (an export would not spare their pickles)
        check_policies(load_rllib_policies(args.from_checkpoint)[0], patches, args.from_checkpoint)
    shared = all(getattr(p, f) == getattr(problems[0], f) for p in problems for f in DATA_SETTINGS)
    return inputs if shared else None


def train(args: argparse.Namespace, given: Collection[str]) -> tune.ResultGrid:
    """Run (or resume) the trials; uses the Ray instance already initialised in this process, if any. ``given``:
    the flags the command line named (:func:`cli.given_flags`)."""
    run_dir = local_run_dir(args.output_dir)
    if (args.overwrite and args.from_checkpoint and run_dir is not None
            and Path(args.from_checkpoint).resolve().is_relative_to(run_dir.resolve())):
        raise UsageError(f"--overwrite would delete --from-checkpoint {args.from_checkpoint} with the run it replaces: "
                         f"copy the checkpoint out of {args.output_dir} first, or pass another --output-dir")
    problems, resources = planned_trials(args, given)
    if args.address and not ray.is_initialized():
        check_cluster_answers(args.address)
    with run_lock(run_dir):
        inputs = read_server_inputs(args, problems, resources)
        if args.overwrite and run_dir is not None:
            delete_run(run_dir)
        quiet_ray_loggers()
        if not ray.is_initialized():
            start_ray(args, sum(bundle.get("CPU", 0) for bundle in trial_resources(resources).bundles))
        # in a Ray instance started before too: ray.init's handler would abort the driver
        interrupt_on_sigterm(lambda: go_on_command(args, given))
        if inputs is not None:  # one copy in the object store for every trial, not one per trial
            inputs = {name: server_inputs.shared() for name, server_inputs in inputs.items()}
        if not args.resume:  # the cluster's GPUs decide the placement
            resources = replace(resources, placement=plan_placement(
                args.servers, args.server_threads, ray.cluster_resources().get("GPU", 0), torch.cuda.is_available(),
                args.num_workers))
        print(resources.placement.describe(resources.num_workers) + f"; {len(problems)} trial(s)", flush=True)
        if (shortfall := cluster_shortfall(trial_resources(resources).required_resources)) is not None:
            print(shortfall, flush=True)
        digests = {problem.backbone: weights_digest(problem.backbone_path) for problem in problems}
        trainable = tune.with_parameters(run_trial, stop=StopRule(args.iterations, args.time_budget),
                                         access=data_access(args), data_dir=problems[0].data_dir, run_dir=run_dir,
                                         inputs=inputs, commit=code_commit(), backbone_digests=digests)
        return build_tuner(args, trainable, problems, resources).fit()


def report(results: tune.ResultGrid, args: argparse.Namespace, given: Collection[str], started: float) -> int:
    """Print the run's closing lines; the exit code: 1 where a trial failed, 130 where the run was interrupted
    (``started``: when this command began, which :func:`training.console.run_interrupted` compares reports with)."""
    data_dir = getattr(args, "problem.data_dir")
    lines, errors = closing_lines(results, args.output_dir, data_dir and absolute_data_dir(data_dir))
    print("\n".join(lines))
    for line in errors:
        print("error: " + line, file=sys.stderr)
    if errors:
        return 1
    if run_interrupted(results, args.iterations, args.output_dir, started):
        print(interrupted_go_on_line(go_on_command(args, given)), file=sys.stderr)
        return 130
    return 0


def raised_in_callback(error: Exception) -> Exception:
    """What ``Tuner.fit`` raised, or, where it is Tune's ``TuneError`` around a user error that one of the run's
    callbacks raised (``StopOnFullDisk``, say: Tune reports it as a TuneError holding its traceback), that error."""
    if isinstance(error, TuneError) and isinstance(error.__context__, UserError):
        return error.__context__
    return error


INTERRUPTED_BEFORE_TRAINING = ("interrupted before training began: run the command again (with --overwrite if it "
                               "says the output directory holds a run)")
"""What an interrupt before any trial started says: the run's directory holds at most Tune's record of the run's
start, which has no trial to resume."""


def main(argv: list[str] | None = None) -> int:
    owns_ray = not ray.is_initialized()

    def run(args: argparse.Namespace, given: frozenset[str]) -> int:
        started = time.time()
        try:
            with signal_handlers_restored(RUN_SIGNALS):
                results = train(args, given)
            if len(results) == 0:  # a Ctrl-C or SIGTERM that Tune took before it made the trials: no report
                raise KeyboardInterrupt(INTERRUPTED_BEFORE_TRAINING)
        except Exception as error:
            stopped = raised_in_callback(error)
            if isinstance(stopped, RunStoppedOnUnreadableImage):
                raise DataError(f"{stopped}; once it reads, go on with {go_on_command(args, given)}") from None
            if isinstance(stopped, UserError):
                raise stopped from None
            last_line = str(error).strip().splitlines()[-1:]  # a TuneError's message is a whole traceback
            check_space_after_failure(local_run_dir(args.output_dir), ": ".join([type(error).__name__, *last_line]))
            raise
        finally:
            if owns_ray and ray.is_initialized():
                ray.shutdown()
        return report(results, args, given, started)

    def interrupted_line(args: argparse.Namespace | None, given: frozenset[str]) -> str:
        # before Tune's loop, which handles the first Ctrl-C itself, or a second one
        run_dir = local_run_dir(args.output_dir) if args is not None else None
        if args is None or run_dir is not None and not any(run_dir.glob(EXPERIMENT_STATE)):
            return INTERRUPTED_BEFORE_TRAINING
        return interrupted_go_on_line(go_on_command(args, given))

    return run_command_line(build_parser, argv, run, interrupted_line)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
