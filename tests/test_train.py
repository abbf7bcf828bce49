"""train.py end to end on a tiny backbone under Ray Tune: a sweep of two trials, checkpoints, --resume, and a new
run started from a checkpoint with another worker count."""

import csv
import dataclasses
import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.fs
import pytest
import ray.exceptions
import torch
from ray import tune
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

import train
from cli import code_commit, given_flags
from envs.errors import UsageError
from envs.problem import PruningProblem
from envs.vit.backbone_checkpoint import REPO_ROOT, weights_digest
from policies.checkpoints import (
    PRUNING_CONFIG,
    CheckpointInfo,
    PolicyCheckpointError,
    best_on_validation,
    list_checkpoints,
    load_exported_policies,
    module_path,
    read_checkpoint_info,
    trial_checkpoints,
)
from tests.tiny_policies import write_checkpoint
from training import ray_session, run_directory
from training.console import (
    ProgressCsv,
    RunStoppedOnUnreadableImage,
    StopOnDataError,
    StopOnFullDisk,
    closing_lines,
    progress_line,
    run_interrupted,
)
from training.learner import PruningPPOLearner
from training.placement import Placement, TrialResources, plan_placement, trial_resources
from training.ray_session import check_cluster_answers, cluster_shortfall, interrupt_on_sigterm
from training.run_directory import check_resumable, delete_run
from training.trial import SCORE, build_config, newest_iteration, restore_newest


def run(tmp_path, tiny_backbone, data_dir, *extra):
    return train.main(["--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--train-limit", "128",
                       "--val-limit", "16", "--prune-points", "1,2,3", "--images-per-env", "4",
                       "--train-batch-size-per-learner", "32", "--minibatch-size", "32", "--num-epochs", "1",
                       "--warm-start-images", "32", "--warm-start-steps", "20", "--num-cpus", "2",
                       "--output-dir", "run", *extra])  # a relative output directory, as in the quick start


def weights(checkpoint, policy):
    return RLModule.from_checkpoint(str(module_path(checkpoint, policy))).state_dict()


def adam_steps(checkpoint) -> dict[str, float]:
    """Each policy's Adam step count in an algorithm checkpoint's learner state: it grows across a resume only
    when the optimizer (and the learner it belongs to) was restored, and starts again from 0 when it was not."""
    with (Path(checkpoint) / "learner_group" / "learner" / "state.pkl").open("rb") as f:
        optimizers = pickle.load(f)["optimizer"]
    return {policy: max(float(p["step"]) for p in optimizers[f"{policy}_default_optimizer"]["state"]["state"].values())
            for policy in ("attention", "similarity")}


def starts_from_the_warm_start(clones, checkpoint) -> None:
    """PPO began from both agents' clones of the heuristics (2 Adam steps of lr 1e-4 move a weight by about
    2e-4; cloning moved them by far more)."""
    for policy in ("attention", "similarity"):
        cloned, trained = RLModule.from_checkpoint(str(clones / policy)).state_dict(), weights(checkpoint, policy)
        for name, value in cloned.items():
            torch.testing.assert_close(trained[name], value, atol=1e-3, rtol=0)


def iterations(trial_dir) -> list[int]:
    """The iterations Tune logged for a trial (progress.csv)."""
    with (trial_dir / "progress.csv").open() as f:
        return [int(row["training_iteration"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_sweep_checkpoints_resume_and_start_from_a_checkpoint(tmp_path, tiny_backbone, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate_py = REPO_ROOT / "evaluate.py"  # from a directory outside the repository, its path
    assert run(tmp_path, tiny_backbone, data_dir, "--target-ratio", "0.3,0.5", "--iterations", "2",
               "--checkpoint-every", "1", "--num-workers", "0", "--num-cpus", "4", "--warm-start", "nms",
               "--train-ratios", "0.2,0.5") == 0
    out, err = capsys.readouterr()
    assert "Overriding environment" not in err  # gymnasium's warning as RLlib registers its env again
    assert "2 trial(s)" in out
    for ratio in ("0.3", "0.5"):
        name = f"target_ratio={ratio}"
        assert f"[{name}] iter    1" in out and f"[{name}] iter    2" in out
        assert out.count(f"[{name}] iter ") == 2 and "agree" in out and "GFLOPs" in out
        trial = tmp_path / "run" / name
        checkpoints = list_checkpoints(tmp_path / "run")
        mine = [c for c in checkpoints if c.parent == trial]
        assert [read_checkpoint_info(c).iteration for c in mine] == [1, 2]  # --checkpoint-every 1
        info = read_checkpoint_info(mine[-1])
        assert info.problem.target_ratio == float(ratio) and info.problem.prune_points == (1, 2, 3)
        assert info.problem.train_ratios == (0.2, 0.5) and info.commit == code_commit()  # None outside a clone
        assert info.backbone_digest == weights_digest(tiny_backbone) is not None  # the weights the agents learned on
        assert info.problem.ppo.minibatch_size == 32 and 0 <= info.val_score <= 100  # exact-budget accuracy, %
        # the latest of equal scores, as Tune keeps it
        best = max(mine, key=lambda c: (read_checkpoint_info(c).val_score, read_checkpoint_info(c).iteration))
        shown = f"run/{name}/{best.name}"
        assert f"[{name}] best checkpoint: {shown} (best on validation: iteration" in out
        assert f"[{name}] evaluate it: python {evaluate_py} --checkpoint {shown} --data-dir {data_dir}" in out
        exported, exported_info = load_exported_policies(mine[-1])  # every checkpoint carries its export
        assert exported_info == info
        for policy, module in exported.items():
            trained = weights(mine[-1], policy)
            assert all(torch.equal(module.state_dict()[k], trained[k]) for k in trained)
        assert iterations(trial) == [1, 2] and list(trial.glob("events.out.tfevents.*"))  # Tune's loggers
        columns = pd.read_csv(trial / "progress.csv").columns  # no column per agent slot (attention_0, ...)
        assert not [c for c in columns if re.search(r"_\d+$", c)] and "env_runners/num_agent_steps_sampled" in columns
        starts_from_the_warm_start(trial / "warm_start", mine[-1])
    assert "elapsed" in out and "left" in out and out.count("| val exact ") == 4  # each iteration validated
    with (tmp_path / "run" / "tuner.pkl").open("rb") as file:  # Tune's record, which a --resume restores
        run_config = pickle.load(file)["_run_config"]
    assert {StopOnDataError, StopOnFullDisk} <= {type(callback) for callback in run_config.callbacks}  # tested alone
    assert run_config.failure_config.max_failures == 2  # --max-failures: Tune restarts a trial whose process died

    # a seed and problem train alike to the bit in processes of their own (ray_session.HASH_SEED: they differ
    # without it): with --train-ratios a trial's target ratio only ranks its checkpoints, so the two trials train
    # one problem. This checks the trials' side of a repeated run; the driver's, what it makes of the command
    # line, the two share.
    checkpoints = {ratio: [c for c in list_checkpoints(tmp_path / "run") if c.parent.name == f"target_ratio={ratio}"]
                   for ratio in ("0.3", "0.5")}
    for of_one, of_other in zip(checkpoints["0.3"], checkpoints["0.5"], strict=True):  # iterations 1 and 2
        for policy in ("attention", "similarity"):
            one, other = weights(of_one, policy), weights(of_other, policy)
            assert one.keys() == other.keys() and all(torch.equal(one[name], other[name]) for name in one)
    clones = RLModule.from_checkpoint(str(tmp_path / "run" / "target_ratio=0.3" / "warm_start" / "similarity"))
    trained = weights(checkpoints["0.3"][-1], "similarity")  # PPO moved them, alike
    assert not all(torch.equal(value, trained[name]) for name, value in clones.state_dict().items())

    # a second start without --resume refuses to touch the run
    assert run(tmp_path, tiny_backbone, data_dir, "--iterations", "2") == 2
    assert "--resume" in capsys.readouterr().err

    # nothing to go on with: every trial has reached --iterations already
    assert train.main(["--output-dir", "run", "--resume", "--iterations", "2", "--num-cpus", "4"]) == 2
    assert "pass more than 2 to go on" in capsys.readouterr().err

    # the run's data moved away (another machine, a new mount): --resume says so, and that its own record is read
    moved, with_data_dir = tmp_path / "moved_data", train.with_data_dir
    monkeypatch.setattr(train, "with_data_dir", lambda problems, args: [
        dataclasses.replace(problem, data_dir=str(moved)) for problem in with_data_dir(problems, args)])
    assert train.main(["--output-dir", "run", "--resume", "--iterations", "3", "--num-cpus", "4"]) == 2
    assert capsys.readouterr().err == (f"error: --resume: the run's data directory {moved} does not exist: pass "
                                       f"--data-dir where its data is now (the run reads the directory it recorded, "
                                       f"whatever MARL_PRUNING_DATA_DIR says)\n")
    monkeypatch.setattr(train, "with_data_dir", with_data_dir)

    # damaged Tune records are refused in one line before Ray starts
    for damaged, record in (("cut_tuner", "tuner.pkl"), ("empty_state", "experiment_state-*.json")):
        copy = Path(shutil.copytree(tmp_path / "run", tmp_path / damaged))
        for path in copy.glob(record):
            path.write_bytes(path.read_bytes()[:50] if record == "tuner.pkl" else b"")
        cut_short = copy / "target_ratio=0.5" / "checkpoint_000009"  # what a full disk leaves: files of 0 bytes
        shutil.copytree(copy / "target_ratio=0.5" / "checkpoint_000001", cut_short)
        for path in cut_short.rglob("*"):
            if path.is_file():
                path.write_bytes(b"")
        assert train.main(["--output-dir", damaged, "--resume", "--iterations", "3", "--num-cpus", "4"]) == 2
        err = capsys.readouterr().err
        assert f"Tune records in {damaged} (tuner.pkl, experiment_state-*.json) do not read" in err, err
        newest = [(copy / name / "checkpoint_000001").resolve() for name in ("target_ratio=0.3", "target_ratio=0.5")]
        assert err.endswith(f"start a new run from a trial's newest complete checkpoint ({newest[0]}, {newest[1]}) "
                            "with --from-checkpoint and another --output-dir\n"), err

    # --resume goes on with the run's own settings: a flag given with another value is refused, naming the run's
    # value (--keep-checkpoints 3 is the run's, given or not)
    assert run(tmp_path, tiny_backbone, data_dir, "--resume", "--iterations", "3", "--target-ratio", "0.3,0.7",
               "--lr", "1e-3", "--num-workers", "2", "--keep-checkpoints", "3", "--max-failures", "5") == 2
    assert capsys.readouterr().err == ("error: --resume goes on with the run's problems, PPO settings and resources "
                                       "(--from-checkpoint starts a new run that may change them): drop or give the "
                                       "run's value: --max-failures (the run's: 2), --num-workers (the run's: 0), "
                                       "--lr (the run's: 0.0001), --target-ratio (the run's: 0.3, 0.5)\n")

    # --resume goes on with both trials (finished ones too) from their latest checkpoints; the command that
    # started the run, given again with --resume, is the run's own settings
    assert run(tmp_path, tiny_backbone, data_dir, "--target-ratio", "0.3,0.5", "--checkpoint-every", "1",
               "--num-workers", "0", "--num-cpus", "4", "--warm-start", "nms", "--train-ratios", "0.2,0.5",
               "--resume", "--iterations", "3") == 0
    out = capsys.readouterr().out
    for name in ("target_ratio=0.3", "target_ratio=0.5"):
        assert f"[{name}] iter    3" in out and f"[{name}] iter    2" not in out
        assert iterations(tmp_path / "run" / name) == [1, 2, 3]
        mine = [c for c in list_checkpoints(tmp_path / "run") if c.parent.name == name]
        assert [read_checkpoint_info(c).iteration for c in mine] == [1, 2, 3]
        steps = [adam_steps(c) for c in mine]  # the optimizers went on from iteration 2's state
        for policy in ("attention", "similarity"):
            assert 0 < steps[0][policy] < steps[1][policy] < steps[2][policy]

    # a new run from a checkpoint, with an env runner: its problem, weights and iteration count go on; run from
    # elsewhere, it reads the data from the --data-dir given (relative to where it runs), not the recorded one
    start = [c for c in list_checkpoints(tmp_path / "run") if c.parent.name == "target_ratio=0.3"][-1]
    assert read_checkpoint_info(start).problem.data_dir == str(data_dir.resolve())  # recorded absolute
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train.main(["--output-dir", "../run2", "--from-checkpoint", str(start), "--iterations", "6",
                       "--num-workers", "1", "--num-cpus", "2", "--data-dir", os.path.relpath(data_dir)]) == 0
    assert f"best checkpoint: {(tmp_path / 'run2').resolve()}/target_ratio=0.3/" in capsys.readouterr().out
    continued = list_checkpoints(tmp_path / "run2")
    assert [read_checkpoint_info(c).iteration for c in continued] == [4, 5, 6]
    assert all(adam_steps(continued[0])[p] > adam_steps(start)[p] for p in ("attention", "similarity"))
    assert read_checkpoint_info(continued[0]).problem == read_checkpoint_info(start).problem
    # the env runner draws each batch while the learner updates on the one before (--sample-ahead, the
    # default), so after the run's first iteration the policy that drew a batch is two updates old when the
    # learner has made its update on it (RLlib's PPO: one)
    with (tmp_path / "run2" / "target_ratio=0.3" / "progress.csv").open() as f:
        rows = list(csv.DictReader(f))
    behind = [float(row["learners/similarity/weights_seq_no"]) - float(row["env_runners/weights_seq_no"])
              for row in rows]
    assert behind[1:] == [2, 2]


def test_bad_settings_exit_cleanly_without_writing(tmp_path, capsys):
    for flags, message in ((["--target-ratio", "1.5"], "--target-ratio: a removal ratio must be in (0, 1), got 1.5"),
                           (["--num-workers", "-1"], "--num-workers: must be at least 0, got -1"),
                           (["--prune-points", "a,b"], "expected comma-separated block indices, got 'a,b'"),
                           (["--resume"], "nothing to resume: no run in"),
                           (["--reduction", "prune"], "--reduction: invalid choice: 'prune'"),
                           (["--iterations", "many"], "--iterations: expected an integer, got 'many'"),
                           (["--target-ratio", "0.3,x"], "comma-separated removal ratios to sweep, got '0.3,x'"),
                           (["--resume", "--from-checkpoint", "x"], "pass one of them"),
                           (["--warm-start-steps", "0"], "--warm-start-steps must be >= 1, got 0"),
                           (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),  # a flag, not a field
                           (["--minibatch-size", "5000"],
                            "--minibatch-size must be in [1, --train-batch-size-per-learner = 4096], got 5000"),
                           (["--from-checkpoint", "x", "--reduction", "drop", "--lr", "1e-4"],
                            "--from-checkpoint goes on with the checkpoint's problem and its PPO settings: drop "
                            "--lr, --reduction"),
                           # flags that the others leave without effect: a sweep over one would run twin trials
                           (["--agents", "attention", "--protected-share", "0.3,0.6"],
                            "--protected-share changes nothing here: the attention agent protects tokens from the "
                            "similarity agent with --agents both"),
                           (["--agents", "attention", "--warm-start", "nms"], "--warm-start changes nothing here: the "
                            "attention agent alone imitates greedy attention"),
                           (["--warm-start", "none", "--warm-start-steps", "100,800"],
                            "--warm-start-steps changes nothing here: --warm-start none fits no warm start"),
                           (["--servers", "3"], "--servers 3: 2 env runner(s) call 2 ViT server(s) at most"),
                           (["--num-workers", "0", "--sample-ahead"], "--sample-ahead samples on the env runners "
                            "while the learner updates: --num-workers 0 has none"),
                           (["--address", "auto", "--num-cpus", "4"], "--num-cpus sizes a local Ray instance")):
        assert train.main(["--output-dir", str(tmp_path / "run"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "run").exists()
    # a cloud URI that pyarrow, through which Tune stores, cannot open: its ValueError is refused at once
    assert train.main(["--output-dir", "foo://bucket/run"]) == 2
    assert capsys.readouterr().err == ("error: --output-dir foo://bucket/run: Unrecognized filesystem type in URI: "
                                       "foo://bucket/run\n")


def test_the_settings_a_problem_does_not_read():
    assert PruningProblem(agents="attention", warm_start="none").settings_without_effect().keys() == {
        "protected_share", "warm_start_images", "warm_start_steps"}  # 'none' changes the attention agent's start
    assert PruningProblem(agents="similarity").settings_without_effect().keys() == {"protected_share"}
    assert PruningProblem().settings_without_effect() == {}


def test_resume_compares_its_run_flags_with_the_runs_own(tmp_path):
    """--servers above the default --num-workers is no refusal on --resume: the run's own env runners call them,
    and a flag given again is compared with the run's record."""
    argv = ["--output-dir", str(tmp_path), "--resume", "--servers", "4"]
    train.check_run_flags_take_effect(train.build_parser().parse_args(argv), {"output_dir", "resume", "servers"})


def test_a_failed_sub_environment_or_env_runner_is_replaced():
    """What test_faults' killed servers rely on: an episode a restarted server lost is dropped with its sub-env
    (StepFailedRecreateEnvError), and a runner that dies is restarted; neither fails the trial."""
    config = build_config(PruningProblem(), TrialResources(2, 1, plan_placement(None, 1, 0, False, 2),
                                                                      True), ["train"], "val")
    assert config.restart_failed_sub_environments and config.restart_failed_env_runners
    assert config.learner_class is PruningPPOLearner  # advantages standardised over the steps the loss counts
    assert config.max_num_env_runner_restarts >= 100


class RestoringAlgorithm:
    """The calls restore_newest makes of an RLlib algorithm; restoring ``damaged`` checkpoints raises."""

    def __init__(self, damaged: set[str]):
        self.damaged, self.restored, self.iteration = damaged, [], 0
        self.env_runner_group = SimpleNamespace(sync_weights=lambda **_: None)
        self.learner_group = None

    def restore_from_path(self, path: str) -> None:
        if Path(path).name in self.damaged:
            raise OSError("truncated file")
        self.restored.append(Path(path).name)
        self.iteration = int(Path(path).name[-6:])


def test_resume_falls_back_to_an_older_checkpoint_when_the_newest_does_not_restore(tmp_path, capsys):
    newest_first = [tmp_path / "checkpoint_000003", tmp_path / "checkpoint_000002", tmp_path / "checkpoint_000001"]
    algo = RestoringAlgorithm({"checkpoint_000003"})
    restore_newest(algo, newest_first)
    assert algo.restored == ["checkpoint_000002"]
    out = capsys.readouterr().out
    assert "cannot restore" in out and "checkpoint_000003 (OSError: truncated file); trying an older one" in out
    assert f"resumed from {newest_first[1]} at iteration 2" in out
    with pytest.raises(PolicyCheckpointError, match="none of .* restores"):
        restore_newest(RestoringAlgorithm({c.name for c in newest_first}), newest_first)


def test_a_resumed_run_draws_other_images_from_the_iteration_it_goes_on_from(tmp_path):
    for iteration in (30, 20):
        (tmp_path / f"checkpoint_0000{iteration}").mkdir()
        (tmp_path / f"checkpoint_0000{iteration}" / PRUNING_CONFIG).write_text(
            json.dumps(CheckpointInfo(PruningProblem(), iteration, 80.0).to_json()))
    (tmp_path / "damaged").mkdir()  # no pruning_config.json: passed over, as restore_newest passes over it
    assert newest_iteration([tmp_path / "damaged", tmp_path / "checkpoint_000030"]) == 30
    assert newest_iteration([]) == 0
    config = build_config(PruningProblem(), TrialResources(1, 1, plan_placement(None, 1, 0, False, 2),
                                                                      True), ["train"], "val", resumed_at=30)
    assert config.env_config["resumed_at"] == 30


def test_resume_names_a_checkpoint_without_its_pruning_config_that_it_passes_over(tmp_path):
    """A newest checkpoint cut short while it was stored (no pruning_config.json) made --resume go back to an older
    one without a word: it is named in one warning line with the checkpoint the trial goes on from, and a trial
    with no complete checkpoint left is refused rather than started again from its beginning."""
    trial = tmp_path / "target_ratio=0.5"
    for number, iteration in ((1, 2), (2, 4)):
        (trial / f"checkpoint_00000{number}").mkdir(parents=True)
        (trial / f"checkpoint_00000{number}" / PRUNING_CONFIG).write_text(
            json.dumps(CheckpointInfo(PruningProblem(), iteration, 80.0).to_json()))
    check_resumable(trial)  # every checkpoint complete: not a word
    (trial / "checkpoint_000003").mkdir()
    with pytest.warns(UserWarning) as warned:
        check_resumable(trial)
    assert [str(warning.message) for warning in warned] == [
        f"--resume: in {trial}, checkpoint_000003 has no pruning_config.json (cut short while it was stored?) and is "
        f"passed over: the trial goes on from checkpoint_000002 (iteration 4)"]
    for number in (1, 2):
        (trial / f"checkpoint_00000{number}" / PRUNING_CONFIG).unlink()
    with pytest.raises(UsageError, match=re.escape(
            f"--resume: no checkpoint of the trial in {trial} is complete: checkpoint_000001, checkpoint_000002, "
            f"checkpoint_000003 have no pruning_config.json (cut short while they were stored?); delete them to start "
            f"the trial again from its beginning, or start a new run with --overwrite")):
        check_resumable(trial)
    check_resumable(tmp_path / "target_ratio=0.3")  # no checkpoint yet: --resume starts it, as it says


class LoggedTrial:
    """What Tune's CSV logger asks of a trial: where its files are, and no checkpoint to fetch them from."""

    def __init__(self, path: Path):
        self.local_path, self.checkpoint = str(path), None

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def test_progress_csv_has_a_column_for_every_metric_and_one_header_across_a_resume(tmp_path):
    """Validation is not in iteration 1's row, and a resumed run reports metrics the first did not: each becomes a
    column when it first appears, the earlier rows blank in it, and pandas reads the file."""
    trial = LoggedTrial(tmp_path)
    first = ProgressCsv()
    first.log_trial_result(1, trial, {"training_iteration": 1, SCORE: None})  # not validated
    first.log_trial_result(2, trial, {"training_iteration": 2, SCORE: 81.5,
                                      "evaluation": {"exact_accuracy": 81.5}})
    first.log_trial_end(trial)
    resumed = ProgressCsv()  # train.py --resume: a new logger appends to the file
    resumed.log_trial_result(3, trial, {"training_iteration": 3, SCORE: None, "timers": {"restore": 1.0}})
    resumed.log_trial_result(4, trial, {"training_iteration": 4, SCORE: None})
    resumed.log_trial_end(trial)
    progress = pd.read_csv(tmp_path / "progress.csv")
    assert list(progress.columns) == ["training_iteration", SCORE, "evaluation/exact_accuracy", "timers/restore"]
    assert progress["training_iteration"].tolist() == [1, 2, 3, 4]
    assert progress["evaluation/exact_accuracy"].tolist()[1] == 81.5 and progress["timers/restore"].tolist()[2] == 1.0
    assert progress[SCORE].isna().tolist() == [True, False, True, True]


def test_overwrite_deletes_the_run_and_keeps_ones_own_files(tmp_path, capsys):
    trial = tmp_path / "target_ratio=0.5"
    for path in ("tuner.pkl", "experiment_state-2026.json", "notes.txt", "target_ratio=0.5/params.json",
                 "target_ratio=0.5/progress.csv", "target_ratio=0.5/checkpoint_000001/pruning_config.json",
                 "target_ratio=0.5/warm_start/attention/module.pt", "target_ratio=0.5/analysis.ipynb",
                 "target_ratio=0.3/params.json", "target_ratio=0.3/result.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    delete_run(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "notes.txt", "target_ratio=0.5", "target_ratio=0.5/analysis.ipynb"]
    assert "kept what is not the run's: notes.txt, target_ratio=0.5/analysis.ipynb" in capsys.readouterr().out
    assert trial.is_dir()


def test_resume_refuses_overwrite_and_an_interrupted_run_says_how_to_go_on(tmp_path, capsys):
    assert train.main(["--output-dir", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--overwrite replaces it: pass one of them" in capsys.readouterr().err
    started = time.time()

    def result(iteration, trial="target_ratio=0.5", **progress):
        return SimpleNamespace(error=None, config={}, path=str(tmp_path / trial), metrics={
            "training_iteration": iteration, "progress": progress, "timestamp": int(started)})

    done, out_of_time, stopped = result(5), result(3, out_of_time=True), result(3)
    never_started = SimpleNamespace(error=None, config=None, metrics={}, path=str(tmp_path / "target_ratio=0.3"))
    run = str(tmp_path)
    assert not run_interrupted([done, out_of_time], 5, run, started)
    assert run_interrupted([done, stopped], 5, run, started) and run_interrupted([done, never_started], 5, run, started)
    # its last iteration's checkpoint stored, then Ctrl-C before Tune heard of it (or resumed at its stop): done
    last = tmp_path / "target_ratio=0.5" / "checkpoint_000004"
    last.mkdir(parents=True)
    (last / PRUNING_CONFIG).write_text(json.dumps(CheckpointInfo(PruningProblem(), 5, 80.0).to_json()))
    assert not run_interrupted([done, stopped], 5, run, started)
    assert closing_lines([never_started, never_started], str(tmp_path)) == (
        ["[target_ratio=0.3] not started: --resume starts it"] * 2, [])


def test_an_interrupt_ends_in_one_line_naming_the_command_that_goes_on(tmp_path, monkeypatch, capsys):
    """Ctrl-C before Tune's loop (decoding the data) or a second one during its shutdown: one line, exit 130; the
    command that goes on keeps the stop rule given and is quoted for the shell."""
    def interrupt(args, given):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupt)
    run = tmp_path / "my run"
    assert train.main(["--output-dir", str(run), "--iterations", "40"]) == 130
    assert capsys.readouterr().err == ("interrupted before training began: run the command again (with --overwrite "
                                       "if it says the output directory holds a run)\n")
    run.mkdir()
    (run / "experiment_state-2026.json").write_text("{}")  # Tune had started the run
    assert train.main(["--output-dir", str(run), "--iterations", "40", "--time-budget", "7.5"]) == 130
    assert capsys.readouterr().err == (f"interrupted: go on with python train.py --output-dir '{run}' --resume "
                                       f"--iterations 40 --time-budget 7.5\n")


def test_a_run_interrupted_in_tunes_loop_ends_with_the_command_that_goes_on(tmp_path, monkeypatch, capsys):
    """Tune's loop takes the first Ctrl-C itself and returns the results: the closing lines, then the command that
    goes on with the data directory given, exit 130."""
    run = tmp_path / "run"
    stopped = SimpleNamespace(error=None, config={}, metrics={"training_iteration": 3, "progress": {}},
                              path=str(run / "target_ratio=0.5"))
    monkeypatch.setattr(train, "train", lambda args, given: [stopped])
    for data in ([], ["--data-dir", str(tmp_path / "data")]):
        assert train.main(["--output-dir", str(run), "--iterations", "40", *data]) == 130
        assert capsys.readouterr().err.endswith(f"interrupted: go on with python train.py --output-dir {run} --resume "
                                                f"{''.join(f'--data-dir {path} ' for path in data[1:])}"
                                                f"--iterations 40\n")


def test_ctrl_c_before_a_resumed_trial_reports_is_no_finish_on_the_time_budget_of_the_command_before(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C in the first seconds of a --resume of a run that ended on its --time-budget: the trial's last report is
    still the earlier command's, whose time budget it reached, which this command's does not end (exit 130 and the
    command that goes on); a time budget reached in this command ends the run (exit 0)."""
    run = tmp_path / "run"
    earlier = int(time.time()) - 60  # Tune stamps a report in whole seconds

    def resumed(reported: Callable[[], int]) -> Callable:
        return lambda args, given: [SimpleNamespace(
            error=None, config={}, path=str(run / "target_ratio=0.5"),
            metrics={"training_iteration": 35, "progress": {"out_of_time": True}, "timestamp": reported()})]

    monkeypatch.setattr(train, "train", resumed(lambda: earlier))
    assert train.main(["--output-dir", str(run), "--resume", "--time-budget", "2"]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: go on with python train.py --output-dir {run} --resume "
                                            f"--time-budget 2\n")
    monkeypatch.setattr(train, "train", resumed(lambda: int(time.time())))
    assert train.main(["--output-dir", str(run), "--resume", "--time-budget", "2"]) == 0
    assert "interrupted" not in capsys.readouterr().err


def test_a_run_stopped_on_an_unreadable_image_names_it_and_the_command_that_goes_on(tmp_path, monkeypatch, capsys):
    """StopOnDataError ends Tuner.fit with the image (test_server.py); the trials' checkpoints stay."""
    def stopped(args, given):
        raise RunStoppedOnUnreadableImage("cannot read image cat/3.png: truncated (replace it with a readable "
                                          "image)")

    monkeypatch.setattr(train, "train", stopped)
    assert train.main(["--output-dir", str(tmp_path / "run"), "--time-budget", "30"]) == 2
    assert capsys.readouterr().err == (f"error: cannot read image cat/3.png: truncated (replace it with a readable "
                                       f"image); once it reads, go on with python train.py --output-dir "
                                       f"{tmp_path / 'run'} --resume --time-budget 30\n")


def test_a_second_train_py_in_a_running_run_is_refused(tmp_path, tiny_backbone, capsys):
    run = tmp_path / "run"
    run.mkdir()
    held = os.open(run, os.O_RDONLY)  # the lock of a train.py running in it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:  # refused before it reads any data (there is none here)
        assert train.main(["--backbone", str(tiny_backbone), "--data-dir", str(tmp_path / "no_data"),
                           "--no-download", "--prune-points", "1,2,3", "--output-dir", str(run)]) == 2
        refused = capsys.readouterr().err
        # --resume while the first has not yet written its run: the same line, not "nothing to resume"
        assert train.main(["--output-dir", str(run), "--resume"]) == 2
        assert capsys.readouterr().err == refused
    finally:
        os.close(held)
    assert refused == (f"error: another train.py is running in {run}: wait for it to end, or pass another "
                       f"--output-dir\n")
    assert not any(run.iterdir())
    # a run that fails while reading its inputs leaves no directory behind, its parents included
    assert train.main(["--backbone", str(tiny_backbone), "--data-dir", str(tmp_path / "no_data"), "--no-download",
                       "--prune-points", "1,2,3", "--output-dir", str(tmp_path / "runs" / "marl")]) == 2
    assert "no_data does not exist" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_an_interrupt_tune_took_before_it_made_the_trials_says_so_and_its_run_is_not_resumed(tmp_path, monkeypatch,
                                                                                             capsys):
    """A Ctrl-C or SIGTERM that Tune's handler takes before Tune has made the trials ends the run with no trial, and
    the directory holds only Tune's record of the run's start: the command says that it was interrupted before
    training began and exits 130 (not 0 in silence), and a --resume of that run is refused in one line (not an
    IndexError)."""
    monkeypatch.setattr(train, "train", lambda args, given: [])  # Tuner.fit's ResultGrid of no trial
    run = tmp_path / "run"
    assert train.main(["--output-dir", str(run)]) == 130
    assert capsys.readouterr().err == train.INTERRUPTED_BEFORE_TRAINING + "\n"
    monkeypatch.undo()
    run.mkdir()  # what Tune wrote before the interrupt
    (run / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [], "runner_data": "{}", "stats": {}}))
    (run / "tuner.pkl").write_bytes(pickle.dumps({}))
    assert train.main(["--output-dir", str(run), "--resume"]) == 2
    assert capsys.readouterr().err == (f"error: nothing to resume: the run in {run} was stopped before its trials "
                                       f"started; run its command again with --overwrite\n")


@pytest.mark.parametrize(("ending", "code"), [(KeyboardInterrupt(), 130), (UsageError("the data did not read"), 2)])
def test_train_py_holds_its_run_lock_while_it_reads_and_trains_and_frees_it_however_it_ends(
        tmp_path, tiny_backbone, monkeypatch, capsys, ending, code):
    """The lock the test above takes by hand is train.py's own: taken before the data is read, a second train.py
    on the same directory is refused while the first is inside, and the directory is free again once the first
    has ended, interrupted or failed. The directory is there before the run, so that the run leaves it behind."""
    run = tmp_path / "run"
    run.mkdir()
    command = ["--backbone", str(tiny_backbone), "--data-dir", str(tmp_path / "no_data"), "--no-download",
               "--prune-points", "1,2,3", "--output-dir", str(run)]
    reading, second = [], []

    def read_server_inputs(args, problems, resources):  # where train.py reads the data, inside its lock
        if reading:
            raise UsageError("a second train.py read the data in a running run")
        reading.append(args)
        second.extend([train.main(command), capsys.readouterr().err])
        raise ending

    monkeypatch.setattr(train, "read_server_inputs", read_server_inputs)
    assert train.main(command) == code
    assert second == [2, f"error: another train.py is running in {run}: wait for it to end, or pass another "
                         f"--output-dir\n"]
    assert capsys.readouterr().err == ("interrupted before training began: run the command again (with --overwrite "
                                       "if it says the output directory holds a run)\n" if code == 130 else
                                       "error: the data did not read\n")
    run_directory.check_not_running(run)  # released: the lock is free to take


@pytest.mark.parametrize("sigint_handler", [signal.default_int_handler, signal.SIG_IGN],
                         ids=["sigint-handled", "sigint-ignored"])
def test_sigterm_interrupts_as_ctrl_c_does(sigint_handler):
    """SIGTERM raises SIGINT, which Python's default handler turns into KeyboardInterrupt (and Tune's, during a
    run, into a stop with checkpoints); where SIGINT is ignored, as in a train.py that a job script puts in the
    background (``&``), it raises KeyboardInterrupt itself: a SIGINT would be dropped, before Tune's handler and
    after it (Tune puts the ignoring back), and the run would go on. Earlier tests may have left another SIGINT
    handler: the one of the case is set."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGINT, sigint_handler)
        interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_ray_gone_only_where_the_gcs_refuses_while_connected(monkeypatch):
    """A group SIGTERM stops Ray's GCS with train.py: gone is a GCS that refuses connections while this process is
    still connected, not one that answers, nor one that this process's own ray.shutdown stopped (disconnected)."""
    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: True)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert not ray_session.ray_gone(address)
    assert ray_session.ray_gone(address)  # closed: refused
    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: False)
    assert not ray_session.ray_gone(address)


def test_a_sigterm_that_stopped_ray_too_ends_with_the_go_on_line(monkeypatch, capsys):
    """Ray's core worker would end the driver after 60 s with exit code 1 and no line saying how to go on; the
    watcher ends it at once, with code 130 and the command. It gives up once the run's SIGTERM handler is gone."""
    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(ray_session.os, "_exit", exit_)
    monkeypatch.setattr(ray_session, "ray_gone", lambda address: True)
    with pytest.raises(SystemExit) as exited:
        ray_session.exit_once_ray_is_gone("127.0.0.1:1", lambda: "python train.py --resume",
                                          signal.getsignal(signal.SIGTERM))
    assert exited.value.code == 130
    assert capsys.readouterr().err.endswith("go on with python train.py --resume\n")
    monkeypatch.setattr(ray_session, "ray_gone", lambda address: False)
    ray_session.exit_once_ray_is_gone("127.0.0.1:1", lambda: "never", object())  # not SIGTERM's handler: returns


def test_train_main_gives_back_the_signal_handlers_it_found(tmp_path, monkeypatch):
    """A Python session that calls train.main keeps its own Ctrl-C and SIGTERM: the run's handlers (ours for
    SIGTERM, Tune's for SIGINT and SIGUSR1, which Tune keeps after a run it did not interrupt) go with the run,
    whether it ends or fails."""
    numbers = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {number: signal.getsignal(number) for number in numbers}

    def run_taking_the_signals(args, given):
        interrupt_on_sigterm()
        for number in (signal.SIGINT, signal.SIGUSR1):
            signal.signal(number, lambda signum, frame: None)  # as Tune's
        raise UsageError("the run failed")

    monkeypatch.setattr(train, "train", run_taking_the_signals)
    mine = {number: (lambda signum, frame: None) for number in numbers}
    try:
        for number, handler in mine.items():
            signal.signal(number, handler)
        assert train.main(["--output-dir", str(tmp_path / "run")]) == 2
        assert {number: signal.getsignal(number) for number in numbers} == mine
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_from_checkpoint_after_an_equals_sign_expands_the_home_directory(tmp_path, tiny_backbone, monkeypatch, capsys):
    """The shell leaves ``~`` in ``--from-checkpoint=~/x`` as it is: train.py reads the checkpoint there."""
    write_checkpoint(tmp_path / "ck", tiny_backbone)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert train.main(["--output-dir", str(tmp_path / "run"), "--from-checkpoint=~/ck", "--iterations", "2"]) == 2
    assert capsys.readouterr().err == ("error: --from-checkpoint is at iteration 3 and --iterations counts them in "
                                       "total: pass more than 3\n")


def test_an_output_dir_this_process_cannot_write_in_is_one_line_before_anything_starts(tmp_path, monkeypatch,
                                                                                         capsys):
    """A read-only disk (or a directory of someone else's) was Tune's traceback, on --resume after Ray had started
    and the data was decoded. Denied as os.access reports it (the tests may run as root, whom permissions do not
    stop)."""
    read_only, access = tmp_path / "ro", os.access
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: Path(path) != read_only and access(path, mode))
    for flags in ([], ["--resume"]):
        assert train.main(["--output-dir", str(read_only / "run"), *flags]) == 2
        assert capsys.readouterr().err == (f"error: --output-dir {read_only / 'run'}: {read_only} is not writable "
                                           "(its permissions, or a read-only disk)\n")
    assert list(read_only.iterdir()) == []


def test_a_cloud_output_dir_that_holds_a_run_is_refused_before_anything_starts(tmp_path, capsys):
    """A second run into a storage URI that held one wrote over its checkpoint_000000 and mixed Tune's records of
    both (two experiment_state files, two event files per trial); --overwrite deletes only on a local disk."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    uri = f"file://{run}"
    for flags in ([], ["--overwrite"]):
        assert train.main(["--output-dir", uri, "--iterations", "1", *flags]) == 2
        assert capsys.readouterr().err == (f"error: {uri} already holds a run; pass --resume to continue it or another "
                                           "--output-dir (--overwrite deletes a run on a local disk only)\n")
    assert [p.name for p in run.iterdir()] == ["tuner.pkl"]


def full_disk_line(run: Path, cause: str) -> str:
    """What train.py prints where ``cause`` stopped a run on a disk with 3 MiB free."""
    return (f"error: the disk of {run} is full (3.0 MiB free) and the run stopped ({cause}): free space, then go on "
            "with --resume (where the run's records did not survive it, --resume names the checkpoints to start a new "
            "run from)\n")


def test_a_run_stopped_by_a_full_disk_says_so_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """Tune's own records fail on a full disk in ways that do not say it (a half-written error.pkl read back:
    EOFError); the run ends in one line that does. On a disk with room the same error is a bug: its traceback."""
    run = tmp_path / "run"
    run.mkdir()

    def cut_short(args, given):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(train, "train", cut_short)
    monkeypatch.setattr(run_directory.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * 2**20))
    assert train.main(["--output-dir", str(run)]) == 2
    assert capsys.readouterr().err == full_disk_line(run, "EOFError: Ran out of input")
    monkeypatch.setattr(run_directory.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**40))
    with pytest.raises(EOFError):
        train.main(["--output-dir", str(run)])


def test_a_trial_that_fails_on_a_full_disk_ends_the_run_instead_of_restarting(tmp_path, monkeypatch, capsys):
    """Tune restarted a trial that failed on a full disk (--max-failures) only to fail again; StopOnFullDisk ends
    the run at the first failure, and train.py says so in one line, though Tune reports an exception raised in a
    callback as a TuneError holding its traceback. With room on the disk a failed trial is restarted."""
    run = tmp_path / "run"
    run.mkdir()
    trial = type("Trial", (), {"path": str(run / "target_ratio=0.5"), "__str__": lambda self: "run_trial_00000"})()
    full = {run, run.parent}  # the run's disk; Ray's temporary directories, say, are on another

    def tune_fit(args, given):
        try:
            StopOnFullDisk().on_trial_recover(iteration=7, trials=[trial], trial=trial)
        except Exception:
            raise tune.TuneError(traceback.format_exc())  # noqa: B904 (as Tune's controller does)
        return []

    monkeypatch.setattr(train, "train", tune_fit)
    monkeypatch.setattr(run_directory.shutil, "disk_usage",
                        lambda path: SimpleNamespace(free=3 * 2**20 if Path(path) in full else 2**40))
    assert train.main(["--output-dir", str(run)]) == 2
    assert capsys.readouterr().err == full_disk_line(run, "trial run_trial_00000 failed")
    monkeypatch.setattr(run_directory.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**40))
    assert StopOnFullDisk().on_trial_error(iteration=7, trials=[trial], trial=trial) is None


def test_overwrite_refuses_to_delete_the_checkpoint_it_starts_from(tmp_path, capsys):
    checkpoint = tmp_path / "target_ratio=0.5" / "checkpoint_000003"
    checkpoint.mkdir(parents=True)
    assert train.main(["--output-dir", str(tmp_path), "--overwrite", "--from-checkpoint", str(checkpoint)]) == 2
    assert "--overwrite would delete --from-checkpoint" in capsys.readouterr().err
    assert checkpoint.is_dir()


def test_a_failed_trial_exits_1_with_one_line_naming_its_traceback(tmp_path, monkeypatch, capsys):
    failed = SimpleNamespace(error=RuntimeError("server gone\n  twice"), path=str(tmp_path / "target_ratio=0.5"),
                             config={"trial": {"name": "target_ratio=0.5"}})
    monkeypatch.setattr(train, "train", lambda args, given: [failed])
    assert train.main(["--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: trial failed: RuntimeError: server gone twice (traceback: {failed.path}/error.txt)\n"
    # a trial whose trainable did not load in its worker fails before its config reaches Tune: failed, not
    # "not started" with exit 0
    unloaded = SimpleNamespace(error=ModuleNotFoundError("No module named 'training'"), config=None,
                               path=str(tmp_path / "target_ratio=0.5"))
    monkeypatch.setattr(train, "train", lambda args, given: [unloaded])
    assert train.main(["--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: trial failed: ModuleNotFoundError: No module named 'training'")
    # as Tune reports a trial that raised in its worker: the cause is named, not Ray's wrapper
    remote = SimpleNamespace(**{**vars(failed), "error": ray.exceptions.RayTaskError(
        "train_trial", "Traceback ...", RuntimeError("server gone"))})
    monkeypatch.setattr(train, "train", lambda args, given: [remote])
    assert train.main(["--output-dir", str(tmp_path)]) == 1
    expected = f"error: trial failed: RuntimeError: server gone (traceback: {failed.path}/error.txt)\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("environment", [None, ""])
def test_without_data_offline_one_line_says_where_to_put_it(command, environment, tmp_path, monkeypatch, capsys):
    """No data and no network: the download is tried (as on a fresh clone), then one line names the layout
    looked for, --data-dir and MARL_PRUNING_DATA_DIR. The variable set empty counts as unset: it was taken for
    the current directory by train.py and refused by evaluate.py as an empty --data-dir, a flag not given."""
    import urllib.request
    from urllib.error import URLError

    import evaluate

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # torchvision makes its directories, then fails
    if environment is None:
        monkeypatch.delenv("MARL_PRUNING_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("MARL_PRUNING_DATA_DIR", environment)
    monkeypatch.chdir(tmp_path)
    main = train.main if command == "train" else evaluate.main
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10 not found in ") and err.count("\n") == 1  # train.py names it absolute
    assert "data and could not be downloaded" in err
    assert "data/cifar10/train.tar" in err and "--data-dir" in err and "MARL_PRUNING_DATA_DIR" in err
    assert list(tmp_path.iterdir()) == []  # neither a run nor the data directory the download made


@pytest.mark.parametrize(("servers", "gpus", "driver_gpu", "expected"), [
    (None, 0, False, Placement(1, 0.0, 2, False, 0.0)),  # CPU only: the learner in the driver
    (3, 0, False, Placement(3, 0.0, 2, False, 0.0)),
    (None, 1, True, Placement(1, 0.25, 2, False, 0.5)),  # one GPU shared by learner and two servers
    (None, 4, True, Placement(4, 0.5, 2, False, 0.5)),
    (None, 8, True, Placement(4, 0.5, 2, False, 0.5)),  # one per env runner: a server none calls would idle
    (None, 4, False, Placement(4, 0.5, 2, True, 0.5)),  # GPU-less head: the learner is an actor
    (4, 1, False, Placement(4, 0.1, 2, True, 0.5)),
    (4, 1, True, Placement(4, 0.1, 2, False, 0.5)),
])
def test_placement(servers, gpus, driver_gpu, expected):
    placement = plan_placement(servers, 2, gpus, driver_gpu, 4)
    assert placement == expected
    # What the trial's placement group asks of Ray, the learner's share included wherever RLlib puts it, is never
    # more than the cluster has: a trial that asks for more waits forever.
    bundles = trial_resources(TrialResources(2, 1, placement, True)).bundles
    assert sum(bundle.get("GPU", 0) for bundle in bundles) <= gpus + 1e-9


def test_sample_ahead_is_the_default_and_runs_recorded_before_it_go_on_without_it():
    from policies.sample_ahead import SampleAheadPPO

    assert train.build_parser().parse_args([]).sample_ahead
    assert not train.build_parser().parse_args(["--no-sample-ahead"]).sample_ahead
    recorded = TrialResources(2, 1, plan_placement(None, 1, 0, False, 2), True).to_json()
    config = build_config(PruningProblem(), TrialResources.from_json(recorded), ["train"], "val")
    assert config.algo_class is SampleAheadPPO
    del recorded["sample_ahead"]  # a run recorded before the setting existed
    assert build_config(PruningProblem(), TrialResources.from_json(recorded), ["train"],
                              "val").algo_class is PPO


class StubEnvRunnerGroup:
    """The two calls of RLlib's EnvRunnerGroup that SampleAheadPPO makes for its requests ahead, recorded."""

    def __init__(self, agent_steps_per_runner: list[int]):
        self.agent_steps_per_runner = agent_steps_per_runner
        self.calls: list[str] = []

    def foreach_env_runner_async(self, func, tag):
        self.calls.append("request")
        return len(self.agent_steps_per_runner)

    def fetch_ready_async_reqs(self, tags, timeout_seconds):
        self.calls.append("fetch")
        return [(runner, ([f"episode of runner {runner}"], {"num_agent_steps_sampled": {"similarity_0": steps}}))
                for runner, steps in enumerate(self.agent_steps_per_runner, 1)]


@pytest.mark.parametrize(("in_flight", "agent_steps", "topped_up"), [
    (True, [64, 64], 0),  # the requests made during the last update hold a whole batch
    (True, [64], 64),  # one env runner failed: the rest is sampled now, synchronously
    (False, [64, 64], 0),  # the first iteration: requested, then awaited
])
def test_sample_ahead_collects_the_requests_in_flight_and_tops_up_a_short_batch(in_flight, agent_steps, topped_up,
                                                                               monkeypatch):
    import policies.sample_ahead as sample_ahead

    synchronous = []

    def sample_now(*, max_agent_steps, **kwargs):
        synchronous.append(max_agent_steps)
        return ["episode sampled now"], [{"num_agent_steps_sampled": {"similarity_0": max_agent_steps}}]

    monkeypatch.setattr(sample_ahead, "synchronous_parallel_sample", sample_now)
    algo = sample_ahead.SampleAheadPPO.__new__(sample_ahead.SampleAheadPPO)  # no Ray: only its sampling runs
    algo.config = SimpleNamespace(sample_timeout_s=60.0, total_train_batch_size=128)
    algo.env_runner_group = StubEnvRunnerGroup(agent_steps)
    algo._sampling_ahead = in_flight
    episodes, metrics = algo._collect_train_batch()
    assert algo.env_runner_group.calls == (["fetch"] if in_flight else ["request", "fetch"])
    assert synchronous == ([topped_up] if topped_up else [])
    assert len(episodes) == len(agent_steps) + bool(topped_up) == len(metrics)
    assert not algo._sampling_ahead  # the next request is made after this batch is collected


def test_throughput_benchmark_counts_an_image_per_episode(tmp_path):
    """benchmarks/train_throughput.py: with both agents an image takes two env steps per pruning point (turns),
    one with one agent; the first iteration (start-up) is left out."""
    from benchmarks.train_throughput import training_episodes_per_second

    with (tmp_path / "progress.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["env_runners/num_env_steps_sampled", "time_this_iter_s"])
        writer.writeheader()
        writer.writerows([{"env_runners/num_env_steps_sampled": steps, "time_this_iter_s": seconds}
                          for steps, seconds in ((600, 100.0), (60, 2.0), (60, 2.0))])
    both = PruningProblem(images_per_env=8, prune_points=(3, 6, 9))
    assert training_episodes_per_second(tmp_path, both) == (pytest.approx(120 * 8 / 6 / 4), 2)
    alone = PruningProblem(images_per_env=8, prune_points=(3, 6, 9), agents="similarity")
    assert training_episodes_per_second(tmp_path, alone) == (pytest.approx(120 * 8 / 3 / 4), 2)


def test_throughput_benchmark_without_pgrep_goes_on_with_a_note(monkeypatch):
    """A slim container without procps: the wait for Ray's processes says it cannot tell, after the training run
    (a FileNotFoundError there lost the run's figures)."""
    import benchmarks.train_throughput as benchmark

    monkeypatch.setattr(benchmark.shutil, "which", lambda name: None)
    assert benchmark.wait_for_ray_to_exit(timeout_s=0.1) is False


def test_progress_line_leaves_out_returns_against_the_other_rollouts():
    """Returns per image mean something against a heuristic's fidelity (above 0 where the agents beat it);
    against an image's other rollouts they average 0 by construction, so the line leaves them out."""

    result = {"training_iteration": 3, "num_env_steps_sampled_lifetime": 120.0,  # RLlib sums it as a float
              "env_runners": {"module_episode_returns_mean": {"attention": 1.6, "similarity": 1.6}, "agree": 0.9,
                              "correct": 0.8, "keep_ratio": 0.125, "gflops": 0.17,
                              "num_episodes_lifetime": 30.0},  # RLlib sums it as a float
              "progress": {"elapsed_s": 65, "remaining_s": 125, "validated": False, "out_of_time": False}}
    heuristic = PruningProblem(rollouts_per_image=1, reward_baseline="distinct", images_per_env=16)
    line = progress_line(result, heuristic)
    assert "R/img[att]=+0.100" in line and "R/img[sim]=+0.100" in line and "1m05s elapsed" in line
    assert "rollouts     480 " in line  # 30 env episodes of 16 images each
    assert "R/img" not in progress_line(result, PruningProblem(reward_baseline="rollouts"))


def test_progress_line_says_when_no_episode_has_finished():
    """An iteration whose batch finished no episode (the first, with several env runners of long episodes)
    reports no episode metrics: the line says so instead of printing nan."""
    result = {"training_iteration": 1, "num_env_steps_sampled_lifetime": 32, "env_runners": {},
              "progress": {"elapsed_s": 5, "remaining_s": 125, "validated": False, "out_of_time": False}}
    line = progress_line(result, PruningProblem())
    assert "no episode finished yet" in line and "nan" not in line
    # RLlib's windowed means read nan where no episode finished in the window (seen with tiny batches)
    result["env_runners"] = {key: float("nan") for key in ("agree", "correct", "keep_ratio", "gflops")}
    line = progress_line(result, PruningProblem())
    assert "no episode finished yet" in line and "nan" not in line


def test_of_equal_scores_the_best_checkpoint_is_the_newest_one_tune_keeps(tmp_path):
    """Tune's checkpoint manager, as build_tuner configures it, keeps the newest of equal scores (the latest too,
    whatever its score) and deletes the older ones: the best checkpoint on validation, which the closing lines and
    evaluate.py name, is the one Tune ranks best, not the earliest of equals, which its rotation deletes first."""
    manager = _CheckpointManager(tune.CheckpointConfig(num_to_keep=3, checkpoint_score_attribute=SCORE,
                                                       checkpoint_score_order="max"))
    for index, score in enumerate([70.0, 80.0, 80.0, 75.0, 80.0, 80.0, 60.0]):
        checkpoint = tmp_path / f"checkpoint_{index:06d}"
        checkpoint.mkdir()
        (checkpoint / PRUNING_CONFIG).write_text(json.dumps(CheckpointInfo(PruningProblem(), 2 * index + 2,
                                                                           score).to_json()))
        manager.register_checkpoint(_TrainingResult(tune.Checkpoint(str(checkpoint)), {SCORE: score}))
    stored = trial_checkpoints(tmp_path)
    assert [path.name for path in stored] == [f"checkpoint_00000{index}" for index in (2, 4, 5, 6)]
    assert best_on_validation(stored) == Path(manager.best_checkpoint_result.checkpoint.path) == stored[2]


@pytest.mark.parametrize("cloud", [False, True])
def test_closing_lines_name_the_best_checkpoint_still_stored(tmp_path, monkeypatch, cloud):
    """From what Tune recorded with each checkpoint, on a local disk or in cloud storage (a filesystem whose
    paths mean nothing on this machine, as a bucket's): the best score among the checkpoints still stored (the
    best one recorded was deleted since), its iteration, and how to evaluate it; nothing is downloaded."""
    storage = tmp_path / "bucket"
    trial = Path("runs", "marl", "target_ratio=0.5")
    for index in (0, 1):
        (storage / trial / f"checkpoint_00000{index}").mkdir(parents=True)
    if cloud:
        filesystem, root, output_dir = pyarrow.fs.SubTreeFileSystem(str(storage), pyarrow.fs.LocalFileSystem()), \
            Path(), "s3://bucket/runs/marl"
    else:
        filesystem, root, output_dir = pyarrow.fs.LocalFileSystem(), storage, str(storage / "runs" / "marl")
    recorded = [(2, 80.0), (4, 82.5), (6, 90.0)]  # checkpoint_000002 (the best) is gone
    for index, (iteration, score) in enumerate(recorded[:2]):
        info = CheckpointInfo(PruningProblem(), iteration, score).to_json()
        (storage / trial / f"checkpoint_00000{index}" / PRUNING_CONFIG).write_text(json.dumps(info))
    checkpoints = [(tune.Checkpoint(str(root / trial / f"checkpoint_00000{index}"), filesystem),
                    {SCORE: score, "training_iteration": iteration})
                   for index, (iteration, score) in enumerate(recorded)]
    problem = {"data_dir": "d", "val_size": 800}  # a backbone that held out fewer images than --val-limit scores
    result = SimpleNamespace(error=None, config={"trial": {"name": "target_ratio=0.5", "problem": problem}},
                             best_checkpoints=checkpoints, checkpoint=checkpoints[0][0], metrics=checkpoints[0][1],
                             path=str(root / trial))
    monkeypatch.chdir(tmp_path)
    lines, errors = closing_lines([result], output_dir)
    shown = f"{output_dir}/target_ratio=0.5/checkpoint_000001" if cloud else \
        "bucket/runs/marl/target_ratio=0.5/checkpoint_000001"
    evaluate_py = REPO_ROOT / "evaluate.py"  # from a directory outside the repository, its path
    evaluate = f"evaluate a local copy of it: python {evaluate_py} --checkpoint <copy>" if cloud else \
        f"evaluate it: python {evaluate_py} --checkpoint {shown}"
    assert errors == []
    assert lines == [f"best checkpoint: {shown} (best on validation: iteration 4, exact-budget accuracy 82.50% "
                     f"on the 800 images that ranked the checkpoints: expect less on others)\n"
                     f"{evaluate} --data-dir d"]
    # a resumed run given --data-dir elsewhere (its records name the directory it started with) is evaluated there
    assert closing_lines([result], output_dir, "/mnt/data")[0][0].endswith(f"{evaluate} --data-dir /mnt/data")
    if not cloud:  # a checkpoint set aside on a resume, which Tune does not rank, is ranked beside Tune's
        aside = storage / trial / "unrecorded_checkpoint_000002"
        aside.mkdir()
        (aside / PRUNING_CONFIG).write_text(json.dumps(CheckpointInfo(PruningProblem(), 7, 95.0).to_json()))
        best = closing_lines([result], output_dir)[0][0]
        assert "unrecorded_checkpoint_000002 (best on validation: iteration 7, exact-budget accuracy 95.00% on" in best
        # of equal scores the latest iteration, the one Tune keeps (policies.checkpoints.validation_rank)
        (aside / PRUNING_CONFIG).write_text(json.dumps(CheckpointInfo(PruningProblem(), 3, 82.5).to_json()))
        best = closing_lines([result], output_dir)[0][0]
        assert "=0.5/checkpoint_000001 (best on validation: iteration 4, exact-budget accuracy 82.50% on" in best
        shutil.rmtree(aside)
        # a checkpoint stored in an iteration that a Ctrl-C kept Tune from recording is ranked too
        unreported = storage / trial / "checkpoint_000003"
        unreported.mkdir()
        (unreported / PRUNING_CONFIG).write_text(json.dumps(CheckpointInfo(PruningProblem(), 8, 99.0).to_json()))
        assert "checkpoint_000003 (best on validation: iteration 8," in closing_lines([result], output_dir)[0][0]
        shutil.rmtree(unreported)
    for index in (0, 1):
        shutil.rmtree(storage / trial / f"checkpoint_00000{index}")
    assert closing_lines([result], output_dir) == (["no checkpoint yet (the first comes with the first validation, "
                                                    "--checkpoint-every): --resume starts this trial again"], [])


def test_a_cluster_too_small_for_one_trial_is_named_and_the_go_on_command_keeps_the_cluster(monkeypatch):
    """Tune waits silently for resources a cluster lacks; the run says so. The go-on command of a run on a
    cluster resumes it there, not in a new local Ray instance."""
    monkeypatch.setattr(ray_session.ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    assert cluster_shortfall({"CPU": 2.0}) is None
    assert cluster_shortfall({"CPU": 4.0, "GPU": 1.0}) == (
        "waiting for the cluster: one trial reserves 4 CPU, 1 GPU and the cluster has 2 CPU, 0 GPU; its trials "
        "start when nodes join (or stop this run and start it again with --overwrite and a smaller --num-workers or "
        "--servers: --resume keeps the run's)")
    argv = ["--output-dir", "runs/x", "--address", "10.0.0.1:6379", "--iterations", "9"]
    args = train.build_parser().parse_args(argv)
    assert train.go_on_command(args, given_flags(train.build_parser(), argv)) == (
        "python train.py --output-dir runs/x --resume --address 10.0.0.1:6379 --iterations 9")
    # what a resumed run reads from its command line alone: how it reaches its data (the run records the data
    # directory it started with, and one moved elsewhere needs it) and its stop rule, in minutes
    argv = ["--output-dir", "runs/x", "--data-dir", "/mnt/my data", "--no-download", "--memory-budget-mb", "0",
            "--num-cpus", "4", "--time-budget", "2h", "--num-workers", "3", "--lr", "1e-4"]
    args = train.build_parser().parse_args(argv)
    assert train.go_on_command(args, given_flags(train.build_parser(), argv)) == (
        "python train.py --output-dir runs/x --resume --num-cpus 4 --data-dir '/mnt/my data' --no-download "
        "--memory-budget-mb 0 --time-budget 120")
    # run from another directory, the command names the script from there
    monkeypatch.chdir(REPO_ROOT / "docs")
    assert train.go_on_command(args, set()) == "python ../train.py --output-dir runs/x --resume"


def test_an_address_no_cluster_answers_at_is_refused_before_the_data_is_read(monkeypatch):
    """ray.init retries such an address without end; 'auto' resolves as Ray does ($RAY_ADDRESS here)."""
    with pytest.raises(ValueError, match=r"--address 127.0.0.1:1: no Ray cluster answers at .*:1"):
        check_cluster_answers("127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ValueError, match=r"--address auto: no Ray cluster answers at .*:1"):
        check_cluster_answers("auto")
    check_cluster_answers("ray://head:10001")  # Ray Client: left to Ray
