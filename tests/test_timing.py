"""envs/vit/timing.py: runs timed in turns, a warm-up round first, ratios taken within each round."""

from __future__ import annotations

import types

import torch

from envs.vit import timing


def test_runs_are_timed_in_turns_after_warm_up_rounds(monkeypatch):
    """Round by round every run times one pass over all the images, in the round's own seeded order; the
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
    rounds = [passes[i:i + 2] for i in range(0, len(passes), 2)]
    assert all(sorted(names) == ["a", "b"] for names in rounds) and len(set(map(tuple, rounds))) == 2
    assert calls == [(name, 2) for name in passes for _ in range(2)]
    clock[0], calls[:], passes[:] = 0.0, [], []
    assert timing.images_per_second_in_turns({"a": run("a"), "b": run("b")}, torch.zeros(4, 1), batch_size=2,
                                             rounds=2, warmup_rounds=2,
                                             on_pass=lambda: passes.append(calls[-1][0])) == rates  # seeded
    # each round's calls took the seconds of that round: 4 images a pass, 2 calls
    assert rates == {"a": [4 / 2.0, 4 / 4.0], "b": [4 / 8.0, 4 / 1.0]}


def test_no_run_has_a_fixed_place_in_the_rounds():
    """A round of many runs drifts within itself: the first run (evaluate.py's unpruned model) is timed early in
    some rounds and late in others, not at one end of every round."""
    order = []
    runs = {index: (lambda batch, index=index: order.append(index)) for index in range(28)}
    timing.images_per_second_in_turns(runs, torch.zeros(1, 1), batch_size=1, rounds=5)
    places = [order[28 * r:28 * (r + 1)].index(0) for r in range(1, 6)]  # after the warm-up round
    assert max(places) - min(places) >= 14, places


def test_ratios_are_taken_within_each_round():
    """Not a ratio of medians: a drift the runs share in a round cancels."""
    ratios = timing.ratios_within_rounds({"pruned": [1.0, 4.0, 2.0], "unpruned": [1.0, 8.0, 1.0]}, "unpruned")
    assert ratios == {"pruned": [1.0, 0.5, 2.0], "unpruned": [1.0, 1.0, 1.0]}
