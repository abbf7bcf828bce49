"""Faults that must cost nothing: a crash while saving, non-finite features, bad paths given to --resume."""

import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from envs import pruning_engine
from envs.atomic_file import interrupts_held, replaced_atomically
from envs.problem import POLICIES, PruningProblem
from envs.vit import features
from policies.checkpoints import (
    CheckpointInfo,
    latest_checkpoint,
    list_checkpoints,
    load_exported_policies,
    module_path,
    read_checkpoint_info,
    trial_checkpoints,
)
from policies.export import stage_checkpoint
from tests.tiny_policies import build_module, write_checkpoint
from training.trial import set_aside_unrecorded

PROBLEM = PruningProblem(backbone="b")


class FakeAlgo:
    """Stands in for an RLlib Algorithm: writes a checkpoint directory with its two policy modules, optionally
    dying half-way."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_to_path(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "rllib_checkpoint.json").write_text("{}")
        if self.crash:
            (Path(path) / "algorithm_state.pkl").write_bytes(b"\x80partial")
            raise OSError("disk full")
        for seed, name in enumerate(POLICIES):
            build_module(name, seed=seed).save_to_path(module_path(path, name))


def test_crash_while_saving_leaves_no_checkpoint_behind(tmp_path):
    """A checkpoint is staged complete before Tune records it; one that died half-way is never listed, as its
    pruning_config.json comes after RLlib's state."""
    good = stage_checkpoint(FakeAlgo(), tmp_path / "trial" / "checkpoint_000000", CheckpointInfo(PROBLEM, 5))
    with pytest.raises(OSError):
        stage_checkpoint(FakeAlgo(crash=True), tmp_path / "trial" / "checkpoint_000001", CheckpointInfo(PROBLEM, 10))
    assert list_checkpoints(tmp_path) == [good] and latest_checkpoint(tmp_path) == good
    assert read_checkpoint_info(good) == CheckpointInfo(PROBLEM, 5)
    assert load_exported_policies(good)[1] == CheckpointInfo(PROBLEM, 5)  # every checkpoint carries its export


def test_a_file_replaced_atomically_is_whole_before_and_after(tmp_path):
    """The training state, a backbone's weights and config, and a rewritten progress file are staged beside their
    path and moved onto it in one step: a write that fails leaves the old file as it was, and no staged copy."""
    path = tmp_path / "train_state.pt"
    path.write_text("old")
    with pytest.raises(OSError), replaced_atomically(path) as staging:
        staging.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]
    with replaced_atomically(path) as staging:
        assert path.read_text() == "old"  # readers see the old file until the new one is complete
        staging.write_text("new")
    assert path.read_text() == "new"


def test_starting_from_bad_checkpoints_fails_in_one_line(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "rllib_checkpoint.json").write_text("{}")
    (corrupt / "pruning_config.json").write_text('{"server": {"backb')
    truncated = write_checkpoint(tmp_path / "truncated", tmp_path / "backbone")  # at iteration 3
    (truncated / "algorithm_state.pkl").write_bytes(pickle.dumps({"weights": list(range(100))})[:100])
    incomplete = write_checkpoint(tmp_path / "incomplete", tmp_path / "backbone")  # no learner state
    (incomplete / "algorithm_state.pkl").write_bytes(pickle.dumps({"weights": list(range(100))}))
    for path, message, extra in (
            (tmp_path / "missing", "does not exist", ()), (not_a_checkpoint, "not a policy checkpoint", ()),
            (corrupt, "not readable JSON", ()),
            (incomplete, "cannot be restored: it lacks learner_group/state.pkl, learner_group/learner/state.pkl", ()),
            (truncated, "algorithm_state.pkl does not read (UnpicklingError", ()),
            (truncated, "--from-checkpoint is at iteration 3 and --iterations counts them in total: pass more than 3",
             ("--iterations", "3"))):
        assert train.main(["--output-dir", str(tmp_path / "run"), "--from-checkpoint", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_output_dir_holding_a_run_is_refused_and_one_holding_anything_else_is_never_replaced(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tuner.pkl").write_bytes(b"")  # what makes a directory a Tune run (Tuner.can_restore)
    (tmp_path / "run" / "progress.csv").write_text("training_iteration\n1\n")
    assert train.main(["--output-dir", str(tmp_path / "run")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "progress.csv").read_text() == "training_iteration\n1\n"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    assert train.main(["--output-dir", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "is not empty and holds no run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
    for output in ("mine/precious.txt", "mine/precious.txt/run"):
        assert train.main(["--output-dir", str(tmp_path / output)]) == 2
        err = capsys.readouterr().err
        assert "precious.txt is a file, not a directory" in err and err.count("\n") == 1


def test_an_output_dir_one_level_off_is_named(tmp_path, capsys, monkeypatch):
    """A trial's directory, a checkpoint, or a backbone.py run, given as the run to resume or to start in: the line
    says which directory would do."""
    run, trial = tmp_path / "run", tmp_path / "run" / "target_ratio=0.5"
    trial.mkdir(parents=True)
    (run / "tuner.pkl").write_bytes(b"")
    (trial / "progress.csv").write_text("training_iteration\n1\n")
    (trial / "params.json").write_text("{}")  # what Tune writes in a trial's directory
    checkpoint = trial / "checkpoint_000003"
    checkpoint.mkdir()
    (checkpoint / "pruning_config.json").write_text("{}")
    (run / "not_a_trial").mkdir()
    (run / "not_a_trial" / "notes.txt").write_text("mine")
    backbone_run = tmp_path / "backbone_run"
    (backbone_run / "backbone").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):  # what makes a backbone checkpoint
        (backbone_run / "backbone" / name).write_text("{}")
    for flags, message in (
            (["--output-dir", str(trial), "--resume"],
             f"nothing to resume: no run in {trial} ({trial} is a trial of the run in {run}: pass --output-dir {run})"),
            (["--output-dir", str(trial)], f"{trial} is not empty and holds no run: choose another --output-dir "
                                           f"({trial} is a trial of the run in {run}: pass --output-dir {run})"),
            (["--output-dir", str(backbone_run), "--resume"],
             f"nothing to resume: no run in {backbone_run} (it holds a backbone.py run: train on its export with "
             f"--backbone {backbone_run / 'backbone'})"),
            (["--output-dir", str(checkpoint), "--resume"],
             f"nothing to resume: no run in {checkpoint} ({checkpoint} is a checkpoint of the run in {run}: pass "
             f"--output-dir {run} to resume it, or start a new run from it with --from-checkpoint {checkpoint})"),
            (["--output-dir", str(run / "typo"), "--resume"], f"nothing to resume: no run in {run / 'typo'}"),
            (["--output-dir", str(run / "not_a_trial")], f"{run / 'not_a_trial'} is not empty and holds no run: "
                                                          f"choose another --output-dir")):
        assert train.main(flags) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert (trial / "progress.csv").read_text() == "training_iteration\n1\n"
    monkeypatch.chdir(tmp_path)  # a relative --output-dir: named as given
    assert train.main(["--output-dir", "run/target_ratio=0.5", "--resume"]) == 2
    assert capsys.readouterr().err == ("error: nothing to resume: no run in run/target_ratio=0.5 (run/target_ratio=0.5 "
                                       "is a trial of the run in run: pass --output-dir run)\n")


def test_a_sweep_that_repeats_a_trial_and_a_negative_time_budget_are_refused(tmp_path, capsys):
    for flags, message in ((["--target-ratio", "0.5,0.5"], "the sweep gives a setting the same value twice"),
                           (["--lr", "1e-4,0.0001"], "the sweep gives a setting the same value twice"),
                           (["--lr", "1e-4,1.0000001e-4"], "two trials of the sweep would share the name lr=0.0001"),
                           # train.py reads --time-budget as a duration (which ones are refused: test_cli.py)
                           (["--time-budget", "-3"], "expected a duration >= 0 in minutes or with a unit")):
        assert train.main(["--output-dir", str(tmp_path / "run"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_engine_counts_the_non_finite_features_it_sanitised(monkeypatch):
    import timm

    from envs.vit.staged_vit import StagedViT

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2,
                            embed_dim=48, num_heads=3).eval()
    real = features.token_features

    def poisoned(*args, **kwargs):
        attention, similarity = real(*args, **kwargs)
        attention[:, 0, 0], similarity[:, 1, 1] = float("nan"), float("inf")
        return attention, similarity

    monkeypatch.setattr(features, "token_features", poisoned)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    engine = pruning_engine.PruningEngine(StagedViT(vit, (1,)), {"num_classes": 10, "mean": [0.5] * 3,
                                                               "std": [0.25] * 3}, images, torch.zeros(2), 0.5,
                                          "merge")
    observations = engine.reset(["a", "b"], [0, 1])
    assert all(np.isfinite(o["attention"]).all() and np.isfinite(o["similarity"]).all() for o in observations)
    assert engine.nonfinite_features == 4


@pytest.fixture(scope="module")
def bad_backbone_settings(tmp_path_factory, tiny_backbone) -> dict[str, str]:
    """What the placeholders in the cases below stand for: an empty data directory, and copies of the tiny backbone
    whose config names a model timm does not know, a held-out split train.py's would overlap, or a data set with no
    'train' split. Made once: train.py refuses each before it writes anything."""
    root = tmp_path_factory.mktemp("bad_settings")
    config = json.loads((tiny_backbone / "config.json").read_text())
    changed = {"UNKNOWN_MODEL": {"model_name": "vit_nonexistent"},  # weights of a model timm does not know
               "HELD_OUT_2000": {"split_seed": 1, "split_sizes": {"train": 48000, "val": 2000}},
               "FOLDER": {"dataset": "folder"}}
    paths = {"EMPTY": root / "empty"}
    paths["EMPTY"].mkdir()
    for name, fields in changed.items():
        paths[name] = Path(shutil.copytree(tiny_backbone, root / name.lower()))
        (paths[name] / "config.json").write_text(json.dumps({**config, **fields}))
    return {name: str(path) for name, path in paths.items()}


# --target-ratio 1.5, --reduction prune and a --prune-points that is no list of integers: test_train.py's
# test_bad_settings_exit_cleanly_without_writing
@pytest.mark.parametrize("flags, message", [
    (["--prune-points", "2,9"], "prune_points"),
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--data-dir", "EMPTY"], "cifar10 not found"),
    (["--backbone", "UNKNOWN_MODEL"], "unknown timm model"),
    (["--backbone", "HELD_OUT_2000", "--split-seed", "0"], "would hold images the backbone trained on"),  # no data read
    (["--backbone", "FOLDER"], "no 'train' split in"),  # the backbone's data set, not cifar10's default
])
def test_train_rejects_bad_problem_settings_before_starting(tmp_path, tiny_backbone, bad_backbone_settings, capsys,
                                                            flags, message):
    flags = [bad_backbone_settings.get(f, f) for f in flags]
    args = ["--backbone", str(tiny_backbone), "--data-dir", bad_backbone_settings["EMPTY"], "--prune-points", "1,2,3",
            "--output-dir", str(tmp_path / "run")]
    assert train.main([*args, *flags]) == 2  # later flags win
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_checkpoints_tune_has_no_record_of_are_set_aside_and_the_highest_iteration_resumes(tmp_path):
    """After a SIGKILL, the disk can hold checkpoints newer than Tune's record; Tune numbers its next ones from its
    record, so they are renamed out of its way, and resuming takes the highest iteration, not the highest
    directory number."""
    from types import SimpleNamespace

    trial = tmp_path / "target_ratio=0.5"
    for index, iteration in ((0, 1), (1, 2), (2, 5), (3, 4)):  # 2 held iteration 3 until a resume wrote 5 there
        stage_checkpoint(FakeAlgo(), trial / f"checkpoint_{index:06d}", CheckpointInfo(PROBLEM, iteration))
    assert [read_checkpoint_info(c).iteration for c in trial_checkpoints(trial)] == [1, 2, 4, 5]
    set_aside_unrecorded(trial, SimpleNamespace(path=str(trial / "checkpoint_000001")))
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000000", "checkpoint_000001",
                                                       "unrecorded_checkpoint_000002", "unrecorded_checkpoint_000003"]
    assert trial_checkpoints(trial)[-1] == trial / "unrecorded_checkpoint_000002"
    stage_checkpoint(FakeAlgo(), trial / "checkpoint_000002", CheckpointInfo(PROBLEM, 7))  # killed once more
    set_aside_unrecorded(trial, None)  # Tune recorded nothing: all of them are set aside
    assert not list(trial.glob("checkpoint_*"))
    assert [read_checkpoint_info(c).iteration for c in trial_checkpoints(trial)] == [1, 2, 4, 7]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_files_are_moved_together_comes_after_the_moves(signal_number):
    """evaluate.py's results are moved into place together: Ctrl-C or SIGTERM amid the moves reaches its handler
    once they are done (and an ignored one stays ignored, as under nohup)."""
    moved, delivered = [], []
    previous = signal.signal(signal_number, lambda signum, frame: delivered.append(list(moved)))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal_number)
            time.sleep(0.1)  # a handler would have run by now
            moved.append("all")
        time.sleep(0.1)
        assert delivered == [["all"]]
        signal.signal(signal_number, signal.SIG_IGN)
        with interrupts_held():
            os.kill(os.getpid(), signal_number)
            time.sleep(0.1)
        assert signal.getsignal(signal_number) is signal.SIG_IGN
    finally:
        signal.signal(signal_number, previous)
