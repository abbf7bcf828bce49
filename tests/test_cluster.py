"""train.py on a real two-node Ray cluster started on this machine (head + one worker node)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from policies.checkpoints import latest_checkpoint, read_checkpoint_info

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"}
    (tmp_path / "home").mkdir()
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    try:
        subprocess.run([ray_bin, "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        yield address, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)


@pytest.mark.slow
def test_one_iteration_across_two_nodes(two_node_cluster, tiny_backbone, data_dir, tmp_path):
    address, env = two_node_cluster
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), "--address", address, "--num-workers", "2",
               "--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--train-limit", "64",
               "--val-limit", "8", "--prune-points", "1,2,3", "--images-per-env", "4", "--iterations", "1",
               "--train-batch-size-per-learner", "32", "--minibatch-size", "32", "--num-epochs", "1",
               "--output-dir", str(out)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iter    1" in done.stdout
    assert read_checkpoint_info(latest_checkpoint(out)).iteration == 1
    nodes = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address={address}"],
                           env=env, capture_output=True, text=True, timeout=120).stdout
    assert nodes.count("node_") >= 2, nodes
