"""train.py on a real two-node Ray cluster started on this machine (head + one worker node), two ViT servers."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policies.checkpoints import latest_checkpoint, read_checkpoint_info

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def active_nodes(ray_bin: str, address: str, env: dict) -> int:
    status = subprocess.run([ray_bin, "status", f"--address={address}"], env=env, capture_output=True,
                            text=True, timeout=60)
    return status.stdout.count("node_") if status.returncode == 0 else 0


@pytest.fixture
def two_node_cluster(tmp_path):
    """Head and worker node as ``ray start --block`` process groups: stopping them kills these two nodes
    only (``ray stop`` would kill every Ray process on the machine, other sessions' included)."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"}
    (tmp_path / "home").mkdir()
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=3", "--disable-usage-stats", "--block"]  # a trial: its process, 2 runners, 2 servers
    starts = [[ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
              [ray_bin, "start", f"--address={address}", *common]]
    nodes = []
    try:
        for count, start in enumerate(starts, 1):
            nodes.append(subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            deadline = time.monotonic() + 180
            while active_nodes(ray_bin, address, env) < count:
                assert time.monotonic() < deadline, f"node {count} of the test cluster did not start"
                time.sleep(1)
        yield address, env
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
        time.sleep(5)
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.system  # left out unless asked for: tests/conftest.py
def test_one_iteration_across_two_nodes(two_node_cluster, tiny_backbone, data_dir, tmp_path):
    address, env = two_node_cluster
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), "--address", address, "--num-workers", "2", "--servers", "2",
               "--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--train-limit", "64",
               "--val-limit", "8", "--prune-points", "1,2,3", "--images-per-env", "4", "--iterations", "1",
               "--warm-start-steps", "20", "--train-batch-size-per-learner", "32", "--minibatch-size", "32",
               "--num-epochs", "1", "--output-dir", str(out)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 env runner(s) over 2 ViT server(s)" in done.stdout
    assert "iter    1" in done.stdout and f"evaluate it: python {REPO / 'evaluate.py'} --checkpoint" in done.stdout
    assert "WARNING" not in done.stderr and "Deprecat" not in done.stderr, done.stderr  # a quiet console
    assert read_checkpoint_info(latest_checkpoint(out)).iteration == 1
    assert active_nodes(str(Path(sys.executable).parent / "ray"), address, env) >= 2
