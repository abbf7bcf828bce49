"""benchmarks/engine_throughput.py: the engine's episodes/s next to the backbone's, on any device, without Ray (a
GPU box has none), at each batch size and precision asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import engine_throughput
from benchmarks.engine_throughput import bench_backbone, bench_engine, loop_episodes
from envs.errors import UsageError
from tests.tiny_policies import PRUNE_POINTS
from tests.without_ray import HIDE_RL_PACKAGES

REPO = Path(__file__).resolve().parent.parent

BENCHMARK_WITHOUT_RAY = HIDE_RL_PACKAGES + """
from benchmarks import engine_throughput

engine_throughput.main(sys.argv[1:])
evaluation_packages = sorted({"pandas", "scipy", "sklearn", "matplotlib"} & set(sys.modules))
assert not evaluation_packages, f"the engine benchmark imported {evaluation_packages}"
"""
"""The benchmark run as on a bare GPU box: without Ray and gymnasium, and needing none of evaluate.py's packages
for tables, intervals and plots (it imports torch, timm and safetensors)."""


def test_the_benchmark_runs_without_ray_and_reports_each_size_and_precision(tiny_backbone, tmp_path):
    """With Ray unimportable and no data set (random images, as on a bare GPU box): two backbone rows, then one
    engine row per size, at each precision, each compared with the timm forward of its precision; the
    table printed is the one in the JSON."""
    output = tmp_path / "engine.json"
    done = subprocess.run([sys.executable, "-c", BENCHMARK_WITHOUT_RAY, "--backbone", str(tiny_backbone),
                           "--prune-points", ",".join(map(str, PRUNE_POINTS)), "--random-images", "--limit", "8",
                           "--batch", "4", "--engine-images", "2", "8", "--seconds", "0", "--device", "cpu",
                           "--precision", "fp32", "bf16", "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    rows = result["rows"]
    assert [(row["kind"], row["precision"]) for row in rows] == [
        (kind, precision) for precision in ("fp32", "bf16") for kind in ("backbone", "backbone", "engine", "engine")]
    assert [row["what"] for row in rows[2:4]] == ["engine in-process, 2 images/call",
                                                  "engine in-process, 8 images/call"]
    speedup = result["gflops_unpruned"] / result["gflops_pruned"]
    for timm_row in (rows[0], rows[4]):
        assert timm_row["of_backbone"] == 1.0
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["of_ceiling"] == pytest.approx(row["of_backbone"] / speedup)
    for row in rows[2:4] + rows[6:8]:  # an episode: a reset and a step per pruning point
        assert row["calls"] == row["episodes"] * (len(PRUNE_POINTS) + 1)
    assert result["machine"]["device"].startswith("cpu (")
    assert result["table"] in done.stdout and result["table"].count("\n") == 1 + len(rows)


def test_random_images_refuse_the_data_set_flags(tiny_backbone):
    """--random-images reads no data set: --data-dir, --dataset and --split given with it (the JSON recorded them
    as if read) are one error line."""
    with pytest.raises(UsageError, match=r"^--data-dir, --split: --random-images reads no data set: drop them$"):
        engine_throughput.parse_args(["--backbone", str(tiny_backbone), "--random-images", "--split", "test",
                                      "--data-dir", "../shared/data"])
    with pytest.raises(UsageError, match=r"^--dataset: --random-images reads no data set: drop it$"):
        engine_throughput.parse_args(["--backbone", str(tiny_backbone), "--random-images", "--dataset", "cifar10"])
    assert engine_throughput.parse_args(["--backbone", str(tiny_backbone), "--split", "test"]).split == "test"


def test_each_call_takes_distinct_images_while_there_are_enough():
    """The engine runs the first stage once per distinct image, so a call that named one twice would flatter it."""
    resets = []

    def call(method: str, keys: list[str], payload: list) -> list[dict]:
        if method == "reset":
            resets.append(payload)
            return [{"live": np.ones(4, dtype=np.float32)}] * len(keys)
        return [{"done": True}] * len(keys)

    loop_episodes(call, 0.0, 8, 8, 0.5, "test", seed=0)
    loop_episodes(call, 0.0, 12, 8, 0.5, "test", seed=0)  # more than there are: then some repeat
    assert sorted(resets[0]) == list(range(8))
    assert len(resets[1]) == 12 and set(resets[1]) <= set(range(8))


def autocast_state() -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for the CPU, and to which dtype."""
    enabled = torch.is_autocast_enabled("cpu")
    return enabled, torch.get_autocast_dtype("cpu") if enabled else None


AUTOCAST = {"fp32": (False, None), "bf16": (True, torch.bfloat16)}


class RecordingEngine:
    """What bench_engine uses of a PruningEngine, with episodes of one step; records the autocast state of every
    call and counts a forward per reset."""

    device = torch.device("cpu")

    def __init__(self, num_images: int):
        self.labels = torch.zeros(num_images)
        self.forwards = 0
        self.autocast: set[tuple[bool, torch.dtype | None]] = set()

    def reset(self, keys: list[str], indices: list[int]) -> list[dict]:
        self.autocast.add(autocast_state())
        self.forwards += 1
        return [{"live": np.ones(4, dtype=np.float32)}] * len(keys)

    def step(self, keys: list[str], keep: list) -> list[dict]:
        self.autocast.add(autocast_state())
        return [{"done": True}] * len(keys)

    def release(self, keys: list[str]) -> None:
        self.autocast.add(autocast_state())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_rows_are_episodes_per_second_under_the_precision_asked(precision):
    """An engine row's images/s is its episodes times the images of each over the time they took (an image is
    an episode), and every engine call runs under the row's precision."""
    engine = RecordingEngine(16)
    rows = bench_engine(engine, [2, 8], 0.01, 0.5, precision)
    assert engine.autocast == {AUTOCAST[precision]}
    for row, size in zip(rows, (2, 8), strict=True):
        assert row["precision"] == precision and row["calls"] == 2 * row["episodes"]  # a reset and a step each
        assert row["images_per_s"] * row["elapsed_s"] == pytest.approx(size * row["episodes"])
        assert row["forwards_per_request"] == pytest.approx(0.5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backbone_rows_are_images_per_second_under_the_precision_asked(precision):
    """A backbone row's images/s is the batch over the median call, and both forwards run under its precision."""

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.autocast: set[tuple[bool, torch.dtype | None]] = set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.autocast.add(autocast_state())
            return x

    timm_forward, staged_forward = Recording(), Recording()
    rows = bench_backbone(timm_forward, staged_forward, torch.zeros(6, 3, 4, 4), 0.0, precision)
    assert timm_forward.autocast == staged_forward.autocast == {AUTOCAST[precision]}
    assert [row["precision"] for row in rows] == [precision] * 2
    for row in rows:
        assert row["images_per_s"] * row["median_call_ms"] / 1000 == pytest.approx(6)
