"""benchmarks/batch1_latency.py: the rows are timed in turns, each ratio to the unpruned row is taken within a
round, and the compiled mode times compiled models."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import batch1_latency, run_from_command_line


def test_ratios_are_taken_within_each_round():
    """Round by round, not as a ratio of medians (here 2.0): a drift between rounds cancels."""
    result = batch1_latency.summary({"pruned": [1.0, 4.0, 2.0], "unpruned": [1.0, 8.0, 1.0]}, "unpruned")
    assert result["pruned"] == {"images_per_s": 2.0, "ratio": 1.0, "ratio_q1": 0.75, "ratio_q3": 1.5}
    assert result["unpruned"]["ratio"] == result["unpruned"]["ratio_q1"] == 1.0


def test_each_mode_times_its_rows(monkeypatch, tiny_policy, data_dir, tmp_path):
    """Both modes time the four rows of the policy's budget; the compiled one through torch.compile (here its
    eager backend), each model compiled once, for any batch size."""
    compile_eagerly, compiled = torch.compile, []

    def compile_recorded(function, **kwargs):
        compiled.append(kwargs)
        return compile_eagerly(function, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_recorded)
    output = tmp_path / "results" / "latency.json"  # its folder made
    result = batch1_latency.main(["--checkpoint", str(tiny_policy), "--data-dir", str(data_dir), "--images", "2",
                                  "--rounds", "2", "--device", "cpu", "--output", str(output)])
    assert compiled == [{"dynamic": True, "mode": None}] * 4
    assert json.loads(output.read_text()) == result and result["budget"] == 0.5
    for mode in ("eager", "compiled"):
        assert list(result[mode]) == ["Baseline (unpruned)", "MARL exact", "Greedy similarity", "Distinctive NMS"]
        assert result[mode]["Baseline (unpruned)"]["ratio"] == 1.0
        assert all(row["images_per_s"] > 0 for row in result[mode].values())


def test_one_round_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_from_command_line(lambda: batch1_latency.main(["--rounds", "1"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --rounds must be at least 2 (quartiles over rounds), got 1\n"
