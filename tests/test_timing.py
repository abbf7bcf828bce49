"""envs/vit/timing.py: runs timed in turns, a warm-up round first, ratios taken within each round."""

from __future__ import annotations

import types

import torch

from envs.vit import timing


def test_runs_are_timed_in_turns_after_warm_up_rounds(monkeypatch):
    """Round by round every run times one pass over all the images, each round starting one run later; the
    warm-up rounds are not counted. The clock here moves only when a run is called, by the seconds each call of
    it takes in that round."""
    clock, calls = [0.0], []
    seconds_per_call = {"a": [9.0, 9.0, 1.0, 2.0], "b": [9.0, 9.0, 4.0, 0.5]}  # per round: 2 warm-up, 2 timed

    def run(name):
        def forward(batch):
            calls.append((name, len(batch)))
            round_index = (len(calls) - 1) // 4  # two runs of two batches a round
            clock[0] += seconds_per_call[name][round_index]
        return forward

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    passes = []
    rates = timing.images_per_second_in_turns({"a": run("a"), "b": run("b")}, torch.zeros(4, 1), batch_size=2,
                                              rounds=2, warmup_rounds=2,
                                              on_pass=lambda: passes.append(calls[-1][0]))
    assert passes == ["a", "b", "b", "a"] * 2
    assert calls == [(name, 2) for name in passes for _ in range(2)]
    assert rates == {"a": [4 / 2.0, 4 / 4.0], "b": [4 / 8.0, 4 / 1.0]}  # 4 images a pass, 2 calls


def test_ratios_are_taken_within_each_round():
    """Not a ratio of medians: a drift the runs share in a round cancels."""
    ratios = timing.ratios_within_rounds({"pruned": [1.0, 4.0, 2.0], "unpruned": [1.0, 8.0, 1.0]}, "unpruned")
    assert ratios == {"pruned": [1.0, 0.5, 2.0], "unpruned": [1.0, 1.0, 1.0]}
