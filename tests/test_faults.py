"""Faults injected for real into running training jobs: dead env runners, a dead ViT server, SIGKILL."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray.rllib.core.rl_module.rl_module import RLModule

import train
from policies.checkpoints import latest_checkpoint, module_path, read_checkpoint_info

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def start_training(tmp_path, tiny_backbone, data_dir, *extra) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "train.py"), "--backbone", str(tiny_backbone), "--data-dir", str(data_dir),
               "--train-limit", "128", "--val-limit", "16", "--prune-points", "1,2,3", "--images-per-env", "4",
               "--train-batch-size-per-learner", "32", "--minibatch-size", "32", "--num-epochs", "1",
               "--num-cpus", "4", "--output-dir", str(tmp_path / "run"), *extra]
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def rows(tmp_path) -> list[dict]:
    path = tmp_path / "run" / "progress.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def wait_for(predicate, job: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def ray_processes(title: str, session: int) -> set[int]:
    """PIDs of this job's Ray session whose title starts with ``title`` (e.g. ray::ViTServer)."""
    listing = subprocess.run(["ps", "-eo", "pid=,sess=,args="], capture_output=True, text=True).stdout
    return {int(pid) for pid, sess, args in (line.split(None, 2) for line in listing.splitlines())
            if int(sess) == session and args.startswith(title)}


def kill_ray_processes(title: str, session: int) -> set[int]:
    """SIGKILL those processes; returns their PIDs."""
    pids = ray_processes(title, session)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def finish(job: subprocess.Popen) -> str:
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-3000:]
    return output


def test_env_runner_killed_mid_training(tmp_path, tiny_backbone, data_dir):
    job = start_training(tmp_path, tiny_backbone, data_dir, "--num-workers", "2", "--iterations", "12")
    wait_for(lambda: len(rows(tmp_path)) >= 1, job)
    session = os.getsid(job.pid)
    killed = kill_ray_processes("ray::MultiAgentEnvRunner", session)
    assert killed
    # the lost runners are replaced: RLlib recreates them, or Ray restarts them before RLlib notices (then
    # RLlib's restart counter stays 0), depending on when the kill lands
    wait_for(lambda: len(ray_processes("ray::MultiAgentEnvRunner", session) - killed) >= len(killed), job)
    finish(job)
    done = rows(tmp_path)
    assert [int(float(r["training_iteration"])) for r in done] == list(range(1, 13))


def test_vit_server_killed_mid_training(tmp_path, tiny_backbone, data_dir):
    job = start_training(tmp_path, tiny_backbone, data_dir, "--num-workers", "1", "--iterations", "5")
    wait_for(lambda: len(rows(tmp_path)) >= 1, job)
    assert kill_ray_processes("ray::ViTServer", os.getsid(job.pid))
    finish(job)
    assert len(rows(tmp_path)) == 5


def test_sigkill_then_resume_loses_at_most_one_interval(tmp_path, tiny_backbone, data_dir):
    job = start_training(tmp_path, tiny_backbone, data_dir, "--num-workers", "0", "--iterations", "50",
                         "--checkpoint-every", "2")
    wait_for(lambda: len(rows(tmp_path)) >= 5, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    logged = len(rows(tmp_path))
    checkpoint = latest_checkpoint(tmp_path / "run")
    saved = read_checkpoint_info(checkpoint).iteration
    assert logged - saved <= 2  # at most one checkpoint interval lost
    before = {p: RLModule.from_checkpoint(str(module_path(checkpoint, p))).state_dict()
              for p in ("attention", "similarity")}
    # resume with nothing left to do: the restored state is written back unchanged
    assert train.main(["--output-dir", str(tmp_path / "run"), "--resume", "--iterations", str(saved),
                       "--num-workers", "0", "--num-cpus", "2"]) == 0
    resumed = latest_checkpoint(tmp_path / "run")
    assert read_checkpoint_info(resumed).iteration == saved
    assert len(rows(tmp_path)) == saved
    for policy, weights in before.items():
        after = RLModule.from_checkpoint(str(module_path(resumed, policy))).state_dict()
        assert all(torch.equal(weights[k], after[k]) for k in weights)
