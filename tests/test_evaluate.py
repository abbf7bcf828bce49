"""evaluate.py: the table's rows and columns, numbers checked against direct computations (timm accuracy,
analytic GFLOPs, the training env's episodes), determinism, timings, and one-line errors.

The tiny backbone is untrained, so its accuracy is near chance; what matters is that every number is the
one it claims to be.
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from ray.rllib.core.columns import Columns

import evaluate
from envs.errors import UsageError, UserError
from envs.problem import POLICIES
from envs.pruning_engine import PruningEngine
from envs.pruning_env import TokenPruningEnv, policy_for_agent
from envs.vit.backbone_checkpoint import load_backbone, normalize, repository_relative
from envs.vit.data import DEFAULT_SPLIT_SEED, ImageSplit, limited_positions, load_split
from envs.vit.device import describe_device, resolve_device
from envs.vit.features import observe
from envs.vit.flops import (
    ViTSpec,
    backbone_gflops,
    exact_budget_schedule,
    feature_gflops,
    merge_gflops,
    schedule_tokens,
)
from envs.vit.pruned_forward import TokenState, exact_forward, initial_state
from envs.vit.staged_vit import StagedViT
from evaluation import results_table, speed
from evaluation.compare import best_heuristics, paired_difference
from evaluation.measure import evaluate_methods
from evaluation.methods import CascadePasses, Method, match_tome_cost, plan_methods, warn_of_dear_cascades
from evaluation.predictions import predict
from evaluation.results_table import prediction_column, write_results
from policies import pruned_vit
from policies.cascade import CascadeViT
from policies.checkpoints import MODULES_DIR, export_path, load_policies, load_rllib_policies, read_checkpoint_info
from policies.distribution import ExactCount
from policies.export import export_policies
from policies.pruned_vit import PrunedViT
from tests.conftest import CIFAR_CLASSES
from tests.readme_examples import run_readme_example
from tests.tiny_policies import (
    FEATURE_COUNTS,
    HIDDEN,
    NUM_PATCHES,
    PRUNE_POINTS,
    TARGET_RATIO,
    write_checkpoint,
)
from tests.without_ray import HIDE_RL_PACKAGES

REPO = Path(__file__).resolve().parent.parent
LIMIT = 64
TIMING = ["images_per_s_b1", "images_per_s_b256", "speedup"]
COLUMNS = ["method", "budget", "accuracy", "f1_macro", "agreement", "gflops", "gflops_backbone",
           "gflops_features", "gflops_policies", "keep_ratio_s1", "keep_ratio_s2", "keep_ratio_s3",
           "keep_ratio", *TIMING, "best_heuristic", "delta_best_heuristic", "delta_ci_low", "delta_ci_high",
           "delta_tome", "delta_tome_ci_low", "delta_tome_ci_high"]
HEURISTIC_ROWS = ["Random", "Greedy attention", "Greedy similarity", "Attention NMS", "Distinctive NMS", "ToMe"]
DELTA = ["best_heuristic", "delta_best_heuristic", "delta_ci_low", "delta_ci_high", "delta_tome", "delta_tome_ci_low",
         "delta_tome_ci_high"]
MARL_ROWS = ["MARL exact", "MARL attention only", "MARL similarity only"]


@pytest.fixture(scope="module")
def split(data_dir):
    return load_split("cifar10", "test", data_dir, input_size=32, limit=LIMIT)


@pytest.fixture(scope="module")
def small_split(split) -> ImageSplit:
    """The split's first 8 images: enough to time at small batch sizes."""
    return ImageSplit(split.images[:8], split.labels[:8], split.class_names)


def cli(checkpoint: Path, data_dir: Path, output: Path, *extra: str) -> list[str]:
    """On the CPU wherever the tests run, so that the numbers compared with CPU computations are those; the best
    heuristic chosen on 48 validation images where the test split is evaluated."""
    on_validation = any(pair == ("--split", "val") for pair in itertools.pairwise(extra))
    selection = [] if on_validation else ["--selection-images", "48"]
    return ["--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--limit", str(LIMIT),
            "--output-dir", str(output), "--batch-size", "24", *selection, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def results(tiny_policy, data_dir, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    output = tmp_path_factory.mktemp("results") / "out"
    assert evaluate.main(cli(tiny_policy, data_dir, output, "--budgets", "0.3,0.5", "--no-speed")) == 0
    return output, pd.read_csv(output / "results.csv")


def without_the_warning_of_no_export(err: str) -> str:
    """A command's stderr without the warning line that a checkpoint without an export gets (``unexported_policy``,
    those ``write_checkpoint`` writes)."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if not (line.startswith("warning: ") and " has no export: " in line))


def rows(table: pd.DataFrame, method: str) -> pd.DataFrame:
    return table[table["method"] == method].set_index("budget")


# -- the table ---------------------------------------------------------------------------------------------


def test_rows_columns_and_files(results):
    output, table = results
    assert list(table.columns) == COLUMNS
    expected = [("Baseline (unpruned)", None), *[(m, 0.3) for m in HEURISTIC_ROWS],
                *[(m, 0.5) for m in HEURISTIC_ROWS + MARL_ROWS]]
    got = [(m, None if math.isnan(b) else b) for m, b in zip(table["method"], table["budget"], strict=True)]
    assert got == expected
    assert table[TIMING].isna().all().all()  # --no-speed
    for name in ("results.csv", "results.json", "results.md", "accuracy_vs_gflops.png"):
        assert (output / name).stat().st_size > 0
    saved = json.loads((output / "results.json").read_text())
    cpu = describe_device(torch.device("cpu"))
    assert [row["method"] for row in saved["rows"]] == list(table["method"])
    assert set(saved["columns"]) == set(COLUMNS) and saved["settings"]["images"] == LIMIT
    assert saved["settings"]["class_names"] == list(CIFAR_CLASSES)  # what the predictions' class numbers are
    assert saved["settings"]["versions"].startswith("marl-token-pruning ") and " ray " in saved["settings"]["versions"]
    assert {key: saved["settings"][key] for key in ("device", "dtype", "speed_batch_sizes", "speed_images",
                                                    "compiled", "speed_rounds")} == {
        "device": cpu, "dtype": "float32", "speed_batch_sizes": [1, 256], "speed_images": None, "compiled": None,
        "speed_rounds": None}
    assert re.fullmatch(r"cpu \(.+, \d+ cores\)", cpu)  # the machine the timings come from
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", saved["settings"]["date"])
    assert saved["settings"]["commit"] == evaluate.code_commit()  # None outside a clone
    arguments = saved["settings"]["arguments"]  # every flag's value, as parsed: the command that made the table
    assert arguments["budgets"] == [0.3, 0.5] and arguments["no_speed"] and arguments["output_dir"] == str(output)
    markdown = (output / "results.md").read_text()
    assert re.search(r"\| method +\| +budget \|", markdown)
    assert "| images_per_s_b1 " not in markdown and "| speedup " not in markdown  # no row was timed
    assert f"dataset: cifar10; split: test; images: {LIMIT}; device: {cpu}; dtype: float32\n" in markdown
    quality = table[["accuracy", "f1_macro", "agreement"]]
    assert ((quality >= 0) & (quality <= 100)).all().all()


def test_every_figure_of_quality_can_be_recomputed_from_the_saved_predictions(results):
    """predictions.csv.gz holds each image's label and every row's answer: each row's accuracy, F1, agreement and
    paired interval against its best heuristic follow from it without running a model."""
    output, table = results
    assert table["best_heuristic"].notna().any()
    saved = pd.read_csv(output / "predictions.csv.gz", index_col="image")
    assert list(saved.index) == list(limited_positions(10_000, LIMIT, DEFAULT_SPLIT_SEED))  # the test set's
    assert list(saved.columns) == ["label", *(prediction_column(m, b) for m, b in
                                              zip(table["method"], table["budget"], strict=True))]
    assert prediction_column("Baseline (unpruned)", None) in saved  # results.json's budget for it
    for row in table.itertuples():
        predicted = saved[prediction_column(row.method, row.budget)]
        assert row.accuracy == pytest.approx(100 * (predicted == saved["label"]).mean())
        assert row.agreement == pytest.approx(100 * (predicted == saved["Baseline (unpruned)"]).mean())
        assert row.f1_macro == pytest.approx(macro_f1(torch.tensor(predicted.to_numpy()),
                                                      torch.tensor(saved["label"].to_numpy())))
        if isinstance(row.best_heuristic, str):
            best = saved[prediction_column(row.best_heuristic, row.budget)]
            figures = paired_difference((predicted == saved["label"]).to_numpy(float),
                                        (best == saved["label"]).to_numpy(float))
            assert figures == pytest.approx((row.delta_best_heuristic, row.delta_ci_low, row.delta_ci_high))


def test_readme_predictions_example_gives_the_committed_tables_interval(monkeypatch, capsys):
    """The README's example on docs/results/predictions.csv.gz prints the committed table's delta_tome for MARL
    exact at r = 0.5: the committed predictions are the ones that table was computed from."""
    monkeypatch.chdir(REPO)
    run_readme_example("Evaluating (`evaluate.py`)")
    row = rows(pd.read_csv(REPO / "docs" / "results" / "results.csv"), "MARL exact").loc[0.5]
    points, low, high = (row[column] for column in ("delta_tome", "delta_tome_ci_low", "delta_tome_ci_high"))
    assert capsys.readouterr().out == f"{points:+.2f} [{low:+.2f}, {high:+.2f}]\n"


def test_baseline_accuracy_is_the_backbones_own(results, tiny_backbone, split):
    model, config = load_backbone(tiny_backbone)
    with torch.no_grad():
        predictions = model(normalize(split.images, config)).argmax(dim=1)
    baseline = rows(results[1], "Baseline (unpruned)").iloc[0]
    assert baseline["accuracy"] == pytest.approx(100.0 * (predictions == split.labels).float().mean().item())
    assert baseline["agreement"] == 100.0 and baseline["keep_ratio"] == 1.0
    assert baseline["f1_macro"] == pytest.approx(macro_f1(predictions, split.labels))


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes among ``labels`` of each one's F1, in percent (0 for a class never right)."""
    scores = []
    for c in labels.unique():
        hits = ((predictions == c) & (labels == c)).sum().item()
        said, true = (predictions == c).sum().item(), (labels == c).sum().item()
        scores.append(2 * hits / (said + true))
    return 100 * sum(scores) / len(scores)


def test_a_pruned_row_scores_its_own_predictions(results, tiny_backbone, split):
    """Accuracy, macro F1 and agreement of a pruned row, recomputed from its model's predictions."""
    unpruned, config = load_backbone(tiny_backbone)
    model = pruned_vit.PrunedViT.from_heuristic(tiny_backbone, "similarity", 0.5, prune_points=PRUNE_POINTS)
    images = normalize(split.images, config)
    with torch.no_grad():
        predictions, reference = model(images).argmax(dim=1), unpruned(images).argmax(dim=1)
    row = rows(results[1], "Greedy similarity").loc[0.5]
    assert not torch.equal(predictions, reference)  # pruning changes some answers: agreement below 100
    assert row["accuracy"] == pytest.approx(100.0 * (predictions == split.labels).float().mean().item())
    assert row["f1_macro"] == pytest.approx(macro_f1(predictions, split.labels))
    assert row["agreement"] == pytest.approx(100.0 * (predictions == reference).float().mean().item())


def test_gflops_are_the_analytic_counts(results, tiny_staged):
    table = results[1]
    spec = ViTSpec.from_model(tiny_staged[0].vit)
    d = spec.embed_dim
    full = backbone_gflops(spec, schedule_tokens(spec, PRUNE_POINTS, [NUM_PATCHES] * 4))
    assert rows(table, "Baseline (unpruned)")["gflops"].iloc[0] == pytest.approx(full)
    for budget in (0.3, 0.5):
        schedule = exact_budget_schedule(NUM_PATCHES, len(PRUNE_POINTS), budget)
        live = schedule[:-1]
        backbone = (backbone_gflops(spec, schedule_tokens(spec, PRUNE_POINTS, schedule))
                    + merge_gflops(spec, live, schedule[1:]))
        expected = {"Random": backbone, "Greedy attention": backbone + sum(n * d for n in live) / 1e9,
                    "Greedy similarity": backbone + sum(n * d + n * n * d for n in live) / 1e9}
        for method, gflops in expected.items():
            row = rows(table, method).loc[budget]
            assert row["gflops"] == pytest.approx(gflops, rel=1e-9)
            assert row["gflops_backbone"] == pytest.approx(backbone, rel=1e-9)
            assert [row[f"keep_ratio_s{i}"] for i in (1, 2, 3)] == pytest.approx(
                [n / NUM_PATCHES for n in schedule[1:]])
    exact = rows(table, "MARL exact").loc[0.5]
    assert exact["gflops_backbone"] == pytest.approx(rows(table, "Random").loc[0.5, "gflops_backbone"])
    live = exact_budget_schedule(NUM_PATCHES, len(PRUNE_POINTS), 0.5)[:-1]
    h = HIDDEN  # token MLP f -> h -> h, logit MLP 2h -> h -> 1, per live token
    policies = sum(n * (f * h + h * h + 2 * h * h + h) for n in live for f in FEATURE_COUNTS.values()) / 1e9
    assert exact["gflops_policies"] == pytest.approx(policies)
    assert exact["gflops"] == pytest.approx(exact["gflops_backbone"] + feature_gflops(spec, live) + policies)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
"""Where the device tests run: the CPU, and a GPU where one is visible."""


@pytest.fixture
def forwards(monkeypatch) -> set[tuple[str, bool, torch.dtype]]:
    """Filled as the test runs: the device type of the images each PrunedViT forward gets, whether autocast is on
    there and to which dtype."""
    seen = set()
    forward_with_kept = PrunedViT.forward_with_kept

    def spy(self, images):
        kind = images.device.type
        seen.add((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)))
        return forward_with_kept(self, images)

    monkeypatch.setattr(PrunedViT, "forward_with_kept", spy)
    return seen


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_rows_run_on_the_device_and_keep_their_token_counts(device, forwards, results, tiny_policy, data_dir,
                                                                     tmp_path, capsys, monkeypatch):
    """--dtype bfloat16: every forward of every row (calibration, selection, accuracy) gets its images on --device
    and runs under autocast to bfloat16; each pruned row still keeps the budget's token counts (every exact
    forward checks what its selections kept, and the keep ratios and GFLOPs are the float32 run's); results.json
    and the printed header name the device and the dtype."""
    checked = []

    def counted_forward(*args, **kwargs):  # the evaluation skips the check (a device read); here it runs
        checked.append(1)
        return exact_forward(*args, **{**kwargs, "check_counts": True})

    monkeypatch.setattr(pruned_vit, "exact_forward", counted_forward)
    output = tmp_path / "out"
    assert evaluate.main(cli(tiny_policy, data_dir, output, "--budgets", "0.5", "--limit", "8", "--selection-images",
                             "8", "--device", device, "--dtype", "bfloat16", "--no-speed", "--cascade", "0.8,0.3",
                             "--cascade-points", "1,3", "--calibration-images", "8")) == 0
    assert forwards == {(device, True, torch.bfloat16)} and checked
    table = pd.read_csv(output / "results.csv")
    exact = ["gflops", "keep_ratio_s1", "keep_ratio_s2", "keep_ratio_s3"]
    for method in HEURISTIC_ROWS + MARL_ROWS:
        assert rows(table, method).loc[0.5, exact].tolist() == pytest.approx(
            rows(results[1], method).loc[0.5, exact].tolist())
    settings = json.loads((output / "results.json").read_text())["settings"]
    assert settings["device"] == describe_device(resolve_device(device)) and settings["dtype"] == "bfloat16"
    assert f"images: 8; device: {settings['device']}; dtype: bfloat16\n" in capsys.readouterr().out


class Terminal(io.StringIO):
    """A stderr that is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_on_a_terminal_only(tiny_staged, small_split, monkeypatch, capsys):
    """evaluate.py's bars (of the forwards and of the timings) are drawn where stderr is a terminal; a log file
    that stderr is redirected to gets none, since each redraw would be a carriage-return line of it."""
    methods = [Method("Baseline (unpruned)", "baseline"), Method("Random", "random", TARGET_RATIO),
               Method("Greedy attention", "attention", TARGET_RATIO)]

    def evaluate_with_bars() -> None:
        evaluate_methods(copy.deepcopy(tiny_staged[0]), tiny_staged[1], small_split, methods, "merge",
                         speed_repeats=1, speed_batch_sizes=(4,))

    evaluate_with_bars()
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate_with_bars()
    drawn = terminal.getvalue()
    assert "evaluating 3 methods: 100%" in drawn and "timing: 100%" in drawn


@pytest.mark.parametrize("device", DEVICES)
def test_timings_at_each_batch_size_asked(device, forwards, tiny_policy, tiny_staged, small_split):
    """One images/s column per batch size asked (the defaults' are the committed results' columns), speedup at the
    largest; timed on the device, in the dtype asked."""
    modules, _ = load_policies(tiny_policy)
    methods = [Method("Baseline (unpruned)", "baseline"), Method("Random", "random", TARGET_RATIO),
               Method("ToMe", "tome", TARGET_RATIO), Method("MARL exact", "policy", TARGET_RATIO, modules)]
    staged = copy.deepcopy(tiny_staged[0])  # moved to the device in place
    table = evaluate_methods(staged, tiny_staged[1], small_split, methods, "merge", speed_repeats=1,
                             speed_batch_sizes=(8, 4), device=device, dtype=torch.bfloat16,
                             progress=False).table
    assert forwards == {(device, True, torch.bfloat16)}
    timing = ["images_per_s_b4", "images_per_s_b8", "speedup"]
    first, last = COLUMNS.index(TIMING[0]), COLUMNS.index(TIMING[-1])
    assert list(table.columns) == [*COLUMNS[:first], *timing, *COLUMNS[last + 1:]]
    assert (table[timing] > 0).all().all() and table.loc[0, "method"] == "Baseline (unpruned)"
    largest = table["images_per_s_b8"]
    assert table["speedup"].tolist() == pytest.approx((largest / largest[0]).tolist())


def test_each_timing_column_times_forwards_of_its_batch_size(monkeypatch, tiny_staged, small_split):
    """images_per_s_bN is the timer's figure for forwards of N images (the timer here gives the sizes it saw)."""
    timer = speed.images_per_second_in_turns

    def sizes_seen(runs, images, batch_size, rounds, warmup_rounds, on_pass):
        sizes = set()

        def recorded(run):
            return lambda batch: sizes.add(len(batch)) or run(batch)

        rates = timer({key: recorded(run) for key, run in runs.items()}, images, batch_size, rounds, warmup_rounds,
                      on_pass)
        whole = len(images) == speed.timed_images(batch_size)  # the size's own pass, not the largest one's
        seen = float(sizes.pop()) if len(sizes) == 1 and whole else math.nan
        return {key: [seen] * rounds for key in rates}

    monkeypatch.setattr(speed, "images_per_second_in_turns", sizes_seen)
    methods = [Method("Baseline (unpruned)", "baseline"), Method("Random", "random", TARGET_RATIO)]
    table = evaluate_methods(copy.deepcopy(tiny_staged[0]), tiny_staged[1], small_split, methods, "merge",
                             speed_repeats=1, speed_batch_sizes=(16, 2, 4), progress=False).table
    assert table[["images_per_s_b2", "images_per_s_b4", "images_per_s_b16"]].values.tolist() == [[2, 4, 16]] * 2


def test_rows_are_timed_in_turns_and_speedup_is_a_ratio_within_rounds(monkeypatch, tiny_staged, small_split, capsys):
    """Each timing column is a row's median over the rounds; speedup is the median of its ratios to the unpruned
    row within each round (here 1.0), not the ratio of the medians (2.0): a drift between rounds cancels. The
    unpruned model is timed as the reference whether or not it is a row of the table. Every round's figure is
    kept (results.json's settings.speed_rounds), and a row whose rounds differ eightfold is warned of."""
    asked = []

    def rates(runs, images, batch_size, rounds, warmup_rounds, on_pass):
        asked.append((rounds, warmup_rounds))
        baseline, random = runs
        return {baseline: [1.0, 8.0, 1.0], random: [1.0, 4.0, 2.0]}

    monkeypatch.setattr(speed, "images_per_second_in_turns", rates)
    random = Method("Random", "random", TARGET_RATIO)
    timing = ["method", "images_per_s_b4", "speedup"]
    for methods, expected in (([random, Method("Baseline (unpruned)", "baseline")],
                               [["Random", 2.0, 1.0], ["Baseline (unpruned)", 1.0, 1.0]]),
                              ([random], [["Random", 2.0, 1.0]])):
        evaluation = evaluate_methods(copy.deepcopy(tiny_staged[0]), tiny_staged[1], small_split, methods,
                                      "merge", speed_repeats=3, speed_batch_sizes=(4,), progress=False)
        assert evaluation.table[timing].values.tolist() == expected
        assert evaluation.speed_rounds["images_per_s_b4"][0] == [1.0, 4.0, 2.0]  # Random's rounds, row 0
        assert capsys.readouterr().err == ("warning: Baseline (unpruned)'s images/s at batch 4 varied 8.0x between "
                                           "the 3 timing rounds (settings.speed_rounds): the machine was busy with "
                                           "other work, and the speed columns may not describe it: time again on a "
                                           "quiet machine\n" if len(methods) == 2 else
                                           "warning: Random at 0.5's images/s at batch 4 varied 4.0x between the 3 "
                                           "timing rounds (settings.speed_rounds): the machine was busy with other "
                                           "work, and the speed columns may not describe it: time again on a quiet "
                                           "machine\n")
    assert asked == [(3, 1)] * 2  # one warm-up round: nothing compiled


def test_compile_times_each_row_compiled_for_every_batch_size(monkeypatch, tiny_policy, tiny_staged, small_split):
    """--compile times each row's forward through torch.compile, one graph for every batch size (dynamic) with
    no break in it (``fullgraph``: nothing read back or shaped by the data) and the eager forward's logits; the
    other columns come from the eager forwards all the same."""
    compile_eagerly, compiled = torch.compile, []

    def compile_recorded(function, **kwargs):
        compiled.append((function.__self__, kwargs))
        return compile_eagerly(function, **{**kwargs, "backend": "eager", "fullgraph": True})

    monkeypatch.setattr(torch, "compile", compile_recorded)
    timer, warmups = speed.images_per_second_in_turns, []

    def timed_and_checked(runs, images, batch_size, rounds, warmup_rounds, *rest):
        warmups.append(warmup_rounds)
        rates = timer(runs, images, batch_size, rounds, warmup_rounds, *rest)
        for run in runs.values():  # the graph just timed (calling the module) gives the eager forward's logits
            model = run.__self__
            torch.testing.assert_close(model(images[:batch_size]), model.forward(images[:batch_size]), rtol=0, atol=0)
        return rates

    monkeypatch.setattr(speed, "images_per_second_in_turns", timed_and_checked)
    modules, _ = load_policies(tiny_policy)
    methods = [Method("Baseline (unpruned)", "baseline"),
               Method("ToMe", "tome", TARGET_RATIO),
               Method("MARL exact", "policy", TARGET_RATIO, modules)]
    kwargs = dict(speed_repeats=1, speed_batch_sizes=(4, 1), progress=False)
    table = evaluate_methods(copy.deepcopy(tiny_staged[0]), tiny_staged[1], small_split, methods, "merge",
                             compile_speed=True, **kwargs).table
    assert [(type(model).__name__, model.selection, options) for model, options in compiled] == [
        ("PrunedViT", selection, {"dynamic": True, "mode": None}) for selection in (None, "tome", "policy")]
    assert (table[["images_per_s_b1", "images_per_s_b4"]] > 0).all().all()
    eager = evaluate_methods(copy.deepcopy(tiny_staged[0]), tiny_staged[1], small_split, methods, "merge",
                             **kwargs).table
    timing = ["images_per_s_b1", "images_per_s_b4", "speedup"]
    pd.testing.assert_frame_equal(table.drop(columns=timing), eager.drop(columns=timing))
    assert warmups == [2, 2, 1, 1]  # per batch size: compiled, a round to compile and one to record CUDA graphs


def test_compiled_rows_at_several_budgets_are_all_timed_compiled(monkeypatch, tiny_staged, split):
    """Compiled rows are timed together, more than the compiler keeps graphs per function by default (8; here
    lowered to 1, as if the table had eight times as many rows), greedy similarity at two budgets: every row's
    forward is timed through its own graph, none falls back to eager (nor fails: the budget is a float in the
    greedy removal order, which the compiler must specialise)."""
    compile_eagerly, graphs = torch.compile, []

    def compile_counted(function, **kwargs):
        def backend(graph, example_inputs):
            graphs.append(function.__self__)
            return graph.forward

        return compile_eagerly(function, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch, "compile", compile_counted)
    methods = [Method("Baseline (unpruned)", "baseline"),
               *(Method("similarity", "similarity", budget) for budget in (0.3, 0.5))]
    models = {method: method.model(tiny_staged[0], tiny_staged[1], "merge") for method in methods}
    with torch._dynamo.config.patch(recompile_limit=1):  # the config's own patch: it is no plain attribute
        rates = speed.timed_in_turns(models, {4: normalize(split.images[:4], tiny_staged[1])}, rounds=1,
                                     compile_on=torch.device("cpu"))
    assert len(models) > 2 and len(graphs) == len(set(graphs)) == len(models)
    assert set(graphs) == set(models.values()) and list(rates[4]) == methods


def test_reduction_comes_from_the_checkpoint_unless_overridden(results, tiny_policy, tiny_backbone, data_dir,
                                                               tiny_staged, tmp_path):
    """Legacy checkpoints (no reduction recorded) were trained dropping tokens and are evaluated so;
    --reduction overrides; every pruned row follows the one setting, and dropping costs no merge GFLOPs."""
    _, merged = results
    legacy = write_checkpoint(tmp_path / "legacy", tiny_backbone, calibrate_on=tiny_staged[0], legacy=True,
                              agents="similarity")  # a legacy pair is refused: it learned former turns
    tables = {}
    for name, path, extra in (("legacy", legacy, ()), ("forced", tiny_policy, ("--reduction", "drop"))):
        output = tmp_path / f"{name}_results"
        assert evaluate.main(cli(path, data_dir, output, "--budgets", "0.5", "--no-speed", *extra)) == 0
        tables[name] = pd.read_csv(output / "results.csv")
        assert json.loads((output / "results.json").read_text())["settings"]["reduction"] == "drop"
    spec = ViTSpec.from_model(tiny_staged[0].vit)
    schedule = exact_budget_schedule(NUM_PATCHES, len(PRUNE_POINTS), 0.5)
    merging = merge_gflops(spec, schedule[:-1], schedule[1:])
    for table in tables.values():
        dropped = rows(table, "Random").loc[0.5, "gflops_backbone"]
        assert dropped == pytest.approx(rows(merged, "Random").loc[0.5, "gflops_backbone"] - merging)
    forced, merging_rows = (table[table["budget"] == 0.5].set_index("method")["agreement"]
                            for table in (tables["forced"], merged))
    assert (forced != merging_rows[forced.index]).any()


def test_timed_images_fill_every_batch_and_say_so(split, tiny_staged):
    """A batch larger than the split is timed at its size, on the split's images repeated, and the results say so."""
    images = speed.speed_images(split, tiny_staged[1], 2 * LIMIT, torch.device("cpu"))
    assert images.shape == (2 * LIMIT, 3, 32, 32) and torch.equal(images[:LIMIT], images[LIMIT:])
    torch.testing.assert_close(images[:LIMIT], normalize(split.images, tiny_staged[1]))
    assert [speed.timed_images(size) for size in (1, 3, 8, 256)] == [8, 9, 8, 256]
    assert speed.speed_note(LIMIT, (1, 256, 1024)) == (
        f"the split's first {LIMIT} images, repeated to fill the passes at batch sizes 256, 1024")
    assert speed.speed_note(5000, (1, 256, 1024)) == "the split's first 1024 images"


# -- the pruned forwards behind the MARL rows --------------------------------------------------------------


def test_policy_rows_cut_to_live_tokens_match_the_engine_layout(tiny_policy, tiny_staged, split):
    """Policies see row i = i-th live token; cutting the dead rows the engine pads to N changes nothing."""
    modules, _ = load_policies(tiny_policy)
    model, config = tiny_staged
    with torch.no_grad():
        state = initial_state(model, normalize(split.images[:4], config))
        keep = torch.arange(NUM_PATCHES) % 3 != 0
        n = int(keep.sum())
        cut = TokenState(torch.cat([state.tokens[:, :1], state.patches[:, keep]], 1), state.live[:, keep],
                         state.size[:, keep], state.positions[:, keep], state.cls_attention[:, keep], 1)
        padded = TokenState(*(torch.cat([t, t.new_zeros(4, NUM_PATCHES - n, *t.shape[2:])], 1) for t in cut[:5]),
                            1)
        for name in POLICIES:
            cut_scores, padded_scores = (
                modules[name].token_scores(getattr(observe(model, s, TARGET_RATIO), name), s.live.float())
                for s in (cut, padded))
            assert padded_scores.shape == (4, NUM_PATCHES)
            torch.testing.assert_close(cut_scores, padded_scores[:, :n])


def test_marl_exact_is_what_the_training_env_does_with_the_most_likely_sets(tiny_policy, tiny_staged, split):
    """The env's turns, with each module's most likely set as its action (what RLlib's deterministic policy
    acts), prune every image exactly as the MARL exact row does: the seam between training and evaluation."""
    modules, _ = load_rllib_policies(tiny_policy)  # the RLlib modules, whose forward_inference training acts with
    model, config = tiny_staged
    count = 16
    engine = PruningEngine(model, config, split.images[:count], split.labels[:count], TARGET_RATIO, "merge")
    env = TokenPruningEnv({"server": engine, "problem": {"images_per_env": count, "reward_baseline": "none",
                                                         "prune_points": list(PRUNE_POINTS)}})
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        actions = {}
        for aid, agent_obs in obs.items():
            batch = {Columns.OBS: {key: torch.from_numpy(value)[None] for key, value in agent_obs.items()}}
            with torch.no_grad():
                inputs = modules[policy_for_agent(aid)].forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
            actions[aid] = ExactCount.from_logits(inputs).to_deterministic().sample()[0].numpy()
        obs, _, terminateds, _, infos = env.step(actions)
        done = terminateds["__all__"]
    images = [infos[f"attention_{i}"]["image"] for i in range(count)]
    method = Method("MARL exact", "policy", TARGET_RATIO, modules)
    pruned = method.model(model, config, "merge")
    logits, kept = pruned.forward_with_kept(normalize(split.images[images], config))
    assert kept[:, 1:].tolist() == [infos[f"attention_{i}"]["kept_per_stage"] for i in range(count)]
    for i in range(count):  # what training reports as GFLOPs is the evaluated row's count, policies aside
        cost = pruned.gflops(kept[i].tolist())
        assert (infos[f"attention_{i}"]["gflops_backbone"], infos[f"attention_{i}"]["gflops_features"]) == \
            pytest.approx((cost.backbone, cost.features), rel=1e-9)
    probabilities = logits.float().softmax(1)
    with torch.no_grad():
        unpruned = model.vit(normalize(split.images[images], config)).argmax(1)
    info = [infos[f"attention_{i}"] for i in range(count)]
    assert [i["agree"] for i in info] == (logits.argmax(1) == unpruned).tolist()
    assert [i["correct"] for i in info] == (logits.argmax(1) == split.labels[images]).tolist()
    torch.testing.assert_close(torch.tensor([i["prob_unpruned_class"] for i in info]),
                               probabilities[torch.arange(count), unpruned], rtol=1e-5, atol=1e-6)


def test_checkpoints_per_budget_take_the_trials_of_a_sweep_over_several_settings():
    """A sweep's trial directories have commas in their names (``target_ratio=0.3,lr=0.001``): a comma starts a
    pair only before ``RATIO=``. A bad pair says what a pair is, a budget given twice says so."""
    trial = "runs/sweep/target_ratio=0.3,lr=0.001/checkpoint_000005"
    assert evaluate._checkpoints_per_budget(f"0.3={trial}, 0.7=runs/b") == {0.3: Path(trial), 0.7: Path("runs/b")}
    assert evaluate._checkpoints_per_budget("0.3 = runs/a , 0.7 = runs/b") == {0.3: Path("runs/a"),
                                                                              0.7: Path("runs/b")}
    for text, message in (("abc=runs/a", r"expected RATIO=PATH pairs .+, got 'abc=runs/a' \(could not convert"),
                          ("0.3=runs/a,=runs/b", r"got '=runs/b' \(could not convert string to float: ''\)"),
                          ("0.3=", r"got '0.3=' \(no path\)"), ("0.3=a,0.30=b", r"^budget 0.3 is given twice$")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            evaluate._checkpoints_per_budget(text)


def test_checkpoints_per_budget_add_marl_rows(tiny_policy, tiny_backbone, data_dir, tiny_staged, tmp_path):
    other = write_checkpoint(tmp_path / "ckpt_03", tiny_backbone, target_ratio=0.3, calibrate_on=tiny_staged[0])
    output = tmp_path / "out"
    assert evaluate.main(cli(tiny_policy, data_dir, output, "--budgets", "0.5", "--no-speed",
                             "--checkpoints-per-budget", f"0.3={other}")) == 0
    table = pd.read_csv(output / "results.csv")
    for budget in (0.3, 0.5):
        assert list(table.loc[table["budget"] == budget, "method"]) == HEURISTIC_ROWS + MARL_ROWS
    settings = json.loads((output / "results.json").read_text())["settings"]
    assert settings["checkpoints"] == {"0.3": str(other), "0.5": str(tiny_policy)}
    assert settings["arguments"]["checkpoints_per_budget"] == {"0.3": str(other)}  # a JSON object, not a repr
    assert settings["iterations"] == {budget: read_checkpoint_info(path).iteration
                                      for budget, path in (("0.3", other), ("0.5", tiny_policy))}


def test_a_policy_trained_at_several_ratios_gets_marl_rows_at_each_budget_among_them(unexported_policy, data_dir,
                                                                                      tmp_path):
    checkpoint = shutil.copytree(unexported_policy, tmp_path / "ckpt")
    config = json.loads((checkpoint / "pruning_config.json").read_text())
    config["problem"]["train_ratios"] = [0.3, 0.5]
    (checkpoint / "pruning_config.json").write_text(json.dumps(config))
    export_policies(checkpoint)  # which records the problem too, as train.py's checkpoint would
    output = tmp_path / "out"
    assert evaluate.main(cli(checkpoint, data_dir, output, "--budgets", "0.3,0.7", "--no-speed")) == 0
    table = pd.read_csv(output / "results.csv")
    for budget, methods in ((0.3, HEURISTIC_ROWS + MARL_ROWS), (0.5, HEURISTIC_ROWS + MARL_ROWS),
                            (0.7, HEURISTIC_ROWS)):
        assert list(table.loc[table["budget"] == budget, "method"]) == methods
    marl, random = rows(table, "MARL exact"), rows(table, "Random")
    for budget in (0.3, 0.5):  # each row prunes at its own budget
        assert marl.loc[budget, "gflops_backbone"] == pytest.approx(random.loc[budget, "gflops_backbone"])
    assert marl.loc[0.3, "keep_ratio"] > marl.loc[0.5, "keep_ratio"]
    assert set(json.loads((output / "results.json").read_text())["settings"]["checkpoints"]) == {"0.3", "0.5"}


def test_single_agent_checkpoint_gives_its_row_only(tmp_path, tiny_backbone):
    """RLlib's files and the export of a one-agent run hold its module only, and evaluate.py plans its row only."""
    path = write_checkpoint(tmp_path / "ckpt", tiny_backbone, agents="similarity")
    unpickled, _ = load_rllib_policies(path)
    export_policies(path)
    modules, info = load_policies(path)
    assert list(unpickled) == list(modules) == ["similarity"]
    methods = plan_methods([0.5], {0.5: (modules, info.problem)})
    assert [m.name for m in methods] == ["Baseline (unpruned)", *HEURISTIC_ROWS, "MARL similarity only"]


# -- errors ---------------------------------------------------------------------------------------------------


def truncated(path: Path) -> Path:
    state = path / MODULES_DIR / "attention" / "module_state.pkl"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return path


REFUSED_ON_THE_ARGUMENTS_ALONE = {"bad_budget", "cascade_of_one_ratio", "cascade_on_validation",
                                  "cascade_points_without_cascade", "calibration_without_cascade", "train_split",
                                  "device_not_a_device", "device_without_gpu", "device_of_another_kind", "bad_dtype",
                                  "bad_speed_batch_sizes", "bad_dataset", "bad_seed", "selection_on_validation",
                                  "speed_repeats_without_speed", "compile_without_speed"}


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "does not exist"),
    ("not_a_checkpoint", "is not a policy checkpoint (no pruning_config.json; train.py writes one in each "
                         "checkpoint); the best checkpoint of this training run on validation is"),
    ("trial_not_a_checkpoint", "is not a policy checkpoint (no pruning_config.json; train.py writes one in each "
                               "checkpoint); the best checkpoint of this training run on validation is"),
    ("truncated", "cannot load the attention policy"),
    ("backbone_as_checkpoint", "is not a policy checkpoint (no pruning_config.json; train.py writes one in each "
                               "checkpoint); it is a backbone checkpoint, which the heuristics run on (evaluate.py "
                               "--heuristics-only --backbone PATH"),
    ("other_backbone", "was it trained on another backbone"),
    ("backbone_moved", " does not exist: checkpoint {path} was trained on it; pass where it is now (--backbone; "
                       "backbone= in Python)"),
    ("backbone_emptied", " is not a backbone checkpoint (no config.json): checkpoint {path} was trained on it; pass "
                         "where it is now (--backbone; backbone= in Python)"),
    ("prune_points_beyond_depth", "prune_points must be"),
    ("missing_module", "has no similarity policy"),
    ("bad_budget", "argument --budgets: a removal ratio must be in (0, 1), got 1.5"),
    ("bad_seed", "argument --seed: must be at least 0, got -1"),
    ("missing_data", "does not exist"),
    ("existing_results", "pass --overwrite"),
    ("existing_json_only", "results.json exists; pass --overwrite"),
    ("output_dir_is_a_file", "is a file, not a directory"),
    ("output_dir_below_a_file", "/out is a file, not a directory"),
    ("one_image", "1 image to evaluate: the paired intervals need at least 2"),
    ("other_classes", "the data set's 10 classes are not the backbone's 10 (the backbone has classes 'class 0', "
                      "'class 1', 'class 2', 'class 3', 'class 4' and 5 more that the data set lacks; the data set has "
                      "classes 'airplane', "),
    ("validation_the_backbone_trained_on", "would hold images the backbone trained on: it held out 2000 images "
                                           "drawn with seed 1, and a validation split must be those or a part of "
                                           "them (seed 1, at most 2000 images)"),
    ("selection_on_validation_the_backbone_trained_on", "the best heuristic of each budget is chosen on validation "
                                                        "images: a validation split of 5000 images drawn with seed 0 "
                                                        "would hold images the backbone trained on"),
    ("unknown_reduction", "reduction must be one of merge, drop"),
    ("extra_checkpoint_other_reduction", "tokens, the main one to merge (pass --reduction to force one)"),
    ("cascade_of_one_ratio", "argument --cascade: expected two removal ratios, FIRST,SECOND, got '0.6'"),
    ("cascade_on_validation", "the cascade is calibrated on the validation split: evaluate it on --split test"),
    ("cascade_points_beyond_depth", "--cascade-points 1,4: prune_points must be"),
    ("cascade_points_without_cascade", "--cascade-points is for --cascade FIRST,SECOND, which was not given"),
    ("calibration_without_cascade", "--calibration-images is for --cascade FIRST,SECOND, which was not given"),
    ("train_split", "argument --split: invalid choice: 'train'"),
    ("cascade_first_forward_too_dear", "cascade (0.1, 0.05): the first forward costs"),
    ("no_validation_to_choose_on", "the best heuristic of each budget is chosen on validation images: validation "
                                   "size 60000 must be between 1 and 49999"),
    ("device_not_a_device", "--device 'bogus' is not a torch device: auto, cpu, cuda, cuda:1, ..."),
    ("device_without_gpu", "--device cuda requested but no GPU is visible"),
    ("device_of_another_kind", "--device 'meta': this project runs on the CPU or a CUDA GPU"),
    ("bad_dtype", "argument --dtype: invalid choice: 'float16'"),
    ("bad_dataset", "argument --dataset: invalid choice: 'mnist'"),
    ("bad_speed_batch_sizes", "argument --speed-batch-sizes: must be at least 1, got 0"),
    ("selection_on_validation", "--selection-images is for --split test: with --split val, the heuristic that "
                                "learned rows are compared with is chosen on the evaluated images"),
    ("speed_repeats_without_speed", "--speed-repeats is for the timing columns, which --no-speed skips"),
    ("compile_without_speed", "--compile is for the timing columns, which --no-speed skips"),
])
def test_errors_are_one_line_and_write_nothing(case, message, unexported_policy, tiny_backbone, data_dir, tmp_path,
                                               capsys, monkeypatch):
    """On a checkpoint without an export: a damaged pickle and a missing module are errors of RLlib's files, and
    the warning about its pickles, printed once it is read, shows which errors come before it is read."""
    path, extra, data, output = unexported_policy, [], data_dir, tmp_path / "out"
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case in ("not_a_checkpoint", "trial_not_a_checkpoint"):  # a train.py output or trial directory
        run = tmp_path / "run"
        for index, score in ((3, 50.0), (4, 40.0)):
            checkpoint = run / "target_ratio=0.5" / f"checkpoint_00000{index}"
            shutil.copytree(unexported_policy, checkpoint)
            config = json.loads((checkpoint / "pruning_config.json").read_text())
            (checkpoint / "pruning_config.json").write_text(json.dumps({**config, "val_score": score}))
        path = run if case == "not_a_checkpoint" else run / "target_ratio=0.5"
        message += f" {run / 'target_ratio=0.5' / 'checkpoint_000003'}"
    elif case == "truncated":
        path = truncated(Path(shutil.copytree(unexported_policy, tmp_path / "copy")))
    elif case == "backbone_as_checkpoint":
        path = tiny_backbone
    elif case == "backbone_moved":
        moved = Path(shutil.copytree(tiny_backbone, tmp_path / "backbone"))
        path = write_checkpoint(tmp_path / "ckpt", moved)
        moved.rename(tmp_path / "moved")
        message = f"error: backbone checkpoint {moved}" + message.format(path=path)
    elif case == "backbone_emptied":  # the directory the checkpoint recorded is there, its backbone is not
        emptied = Path(shutil.copytree(tiny_backbone, tmp_path / "backbone"))
        path = write_checkpoint(tmp_path / "ckpt", emptied)
        (emptied / "config.json").unlink()
        message = f"error: {emptied}" + message.format(path=path)
    elif case == "other_backbone":
        path = write_checkpoint(tmp_path / "ckpt", tiny_backbone, num_patches=16)
    elif case == "prune_points_beyond_depth":
        path = write_checkpoint(tmp_path / "ckpt", tiny_backbone, prune_points=(3, 6, 9))
    elif case == "missing_module":
        path = Path(shutil.copytree(unexported_policy, tmp_path / "copy"))
        shutil.rmtree(path / MODULES_DIR / "similarity")
    elif case == "bad_budget":
        extra = ["--budgets", "0.5,1.5"]
    elif case == "missing_data":  # the download is the offline test's (test_train.py)
        data, extra = tmp_path / "no_data", ["--no-download"]
    elif case in ("existing_results", "existing_json_only"):
        output.mkdir()
        (output / ("results.csv" if case == "existing_results" else "results.json")).write_text("keep me\n")
    elif case == "output_dir_is_a_file":
        output.write_text("keep me\n")
    elif case == "output_dir_below_a_file":  # caught before the evaluation, not when writing after it
        output.write_text("keep me\n")
        output = output / "results"
    elif case == "one_image":
        extra = ["--limit", "1"]
    elif case in ("other_classes", "validation_the_backbone_trained_on",
                  "selection_on_validation_the_backbone_trained_on"):
        backbone = Path(shutil.copytree(tiny_backbone, tmp_path / "backbone"))
        config = json.loads((backbone / "config.json").read_text())
        config.update({"class_names": [f"class {i}" for i in range(10)]} if case == "other_classes" else
                      {"split_seed": 1, "split_sizes": {"train": 48000, "val": 2000}})
        (backbone / "config.json").write_text(json.dumps(config))
        extra = ["--backbone", str(backbone), *(["--split", "val"] if case.startswith("validation") else [])]
        if case != "other_classes":
            data = tmp_path / "no_data"  # refused before any data is read, the test split's too
    elif case == "unknown_reduction":
        path = write_checkpoint(tmp_path / "ckpt", tiny_backbone, reduction="prune")
    elif case == "no_validation_to_choose_on":
        path = write_checkpoint(tmp_path / "ckpt", tiny_backbone, val_size=60000)
    elif case == "extra_checkpoint_other_reduction":
        other = write_checkpoint(tmp_path / "ckpt", tiny_backbone, target_ratio=0.3, reduction="drop")
        extra = ["--checkpoints-per-budget", f"0.3={other}"]
    elif case.startswith("device"):
        extra = ["--device", {"device_not_a_device": "bogus", "device_without_gpu": "cuda",
                              "device_of_another_kind": "meta"}[case]]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU-less machine, wherever this runs
    elif case == "bad_dtype":
        extra = ["--dtype", "float16"]
    elif case == "bad_dataset":
        extra = ["--dataset", "mnist"]
    elif case == "bad_seed":
        extra = ["--seed", "-1"]
    elif case == "bad_speed_batch_sizes":
        extra = ["--speed-batch-sizes", "1,0"]
    elif case.endswith("without_cascade"):
        extra = ["--cascade-points", "1,2"] if case.startswith("cascade") else ["--calibration-images", "32"]
    elif case == "selection_on_validation":  # its default value, given, is refused too
        extra = ["--split", "val", "--selection-images", "2000"]
    elif case.endswith("without_speed"):  # every row evaluates with --no-speed
        extra = ["--speed-repeats", "3"] if case.startswith("speed") else ["--compile"]
    elif case == "train_split":  # the backbone trained on it
        extra = ["--split", "train"]
    elif case.startswith("cascade"):
        extra = ["--cascade", {"cascade_of_one_ratio": "0.6", "cascade_first_forward_too_dear": "0.1,0.05"}.get(
                     case, "0.6,0.2"),
                 "--cascade-points", "1,4" if case == "cascade_points_beyond_depth" else "1,2,3",
                 "--calibration-images", "32", *(["--split", "val"] if case == "cascade_on_validation" else [])]
    capsys.readouterr()
    assert evaluate.main(cli(path, data, output, "--no-speed", *extra)) == 2
    printed = capsys.readouterr().err
    err = without_the_warning_of_no_export(printed)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    if case in REFUSED_ON_THE_ARGUMENTS_ALONE:  # before the checkpoint is read, so without its warning
        assert printed == err
    if case in ("existing_results", "existing_json_only"):
        assert [path.read_text() for path in output.iterdir()] == ["keep me\n"]
    elif case == "output_dir_is_a_file":
        assert output.read_text() == "keep me\n"
    elif case == "output_dir_below_a_file":
        assert output.parent.read_text() == "keep me\n"
    else:
        assert not output.exists()


def test_a_checkpoint_in_the_place_of_another_or_of_the_output_is_named(tiny_policy, tiny_backbone, tmp_path, capsys):
    """A policy (a checkpoint, or its export shared under another name) as --backbone, a checkpoint as --output-dir
    (the results would land among its files) and an empty --output-dir (an unset variable: the current directory)
    are refused in one line before anything is read."""
    checkpoint = Path(shutil.copytree(tiny_policy, tmp_path / "checkpoint"))
    shared = export_path(checkpoint).rename(tmp_path / "shared_policy")
    for flags, message in (
            (["--heuristics-only", "--backbone", str(shared)],
             f"error: --backbone {shared} is a policy checkpoint: evaluate it with --checkpoint {shared} "
             f"(without --heuristics-only)\n"),
            (["--output-dir", str(shared)],
             f"error: --output-dir {shared} is a checkpoint (a policy's or a backbone's): give the results a "
             f"directory of their own\n"),
            (["--heuristics-only", "--backbone", str(tiny_policy)],
             f"error: --backbone {tiny_policy} is a policy checkpoint: evaluate it with --checkpoint {tiny_policy} "
             f"(without --heuristics-only)\n"),
            (["--checkpoint", str(tiny_policy), "--output-dir", str(tiny_policy)],
             f"error: --output-dir {tiny_policy} is a checkpoint (a policy's or a backbone's): give the results a "
             f"directory of their own\n"),
            (["--heuristics-only", "--backbone", str(tiny_backbone), "--output-dir", str(tiny_backbone)],
             f"error: --output-dir {tiny_backbone} is a checkpoint (a policy's or a backbone's): give the results "
             f"a directory of their own\n"),
            (["--output-dir="], "error: argument --output-dir: empty: name a directory (an unset shell variable?)\n")):
        before = sorted(path.name for path in Path.cwd().iterdir())
        assert evaluate.main([*flags, "--data-dir", str(tmp_path / "no_data"), "--no-speed"]) == 2
        assert capsys.readouterr().err == message
        assert sorted(path.name for path in Path.cwd().iterdir()) == before


def test_errors_say_which_checkpoint_or_data_directory_would_do(tiny_backbone, data_dir, image_folder_224, tmp_path,
                                                                capsys):
    """The default policy on one's own backbone, a checkpoint whose recorded data directory exists while the one
    given does not, and one's own data with the heuristics' default backbone: the line says what to pass."""
    assert evaluate.main(["--heuristics-only", "--dataset", "folder", "--data-dir", str(image_folder_224),
                          "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith(f"the backbone is {REPO / 'reference' / 'vit_tiny_cifar10'} (the "
                                            f"reference; pass yours with --backbone)\n")
    assert evaluate.main(["--backbone", str(tiny_backbone), "--output-dir", str(tmp_path / "out")]) == 2
    assert "train one on yours with train.py --backbone and pass --checkpoint" in capsys.readouterr().err
    checkpoint = write_checkpoint(tmp_path / "ckpt", tiny_backbone, data_dir=str(data_dir))
    assert evaluate.main(cli(checkpoint, tmp_path / "no_data", tmp_path / "out", "--no-download")) == 2
    err = without_the_warning_of_no_export(capsys.readouterr().err)
    assert f"the checkpoint was trained on the data in {data_dir}: pass --data-dir {data_dir}" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_heuristics_only_evaluates_a_backbone_without_a_policy(tiny_backbone, data_dir, tmp_path, capsys):
    """What the agents will have to beat on one's own backbone, before training them: the heuristics, ToMe and a
    cascade, at the pruning points given, on the validation split the backbone held out."""
    output = tmp_path / "out"
    assert evaluate.main(["--heuristics-only", "--backbone", str(tiny_backbone), "--prune-points", "1,2,3",
                          "--data-dir", str(data_dir), "--limit", str(LIMIT), "--budgets", "0.3,0.5", "--no-speed",
                          "--cascade", "0.6,0.2", "--cascade-points", "1,2", "--calibration-images", "32",
                          "--selection-images", "48",
                          "--batch-size", "24", "--output-dir", str(output)]) == 0
    table = pd.read_csv(output / "results.csv")
    assert not table["method"].isin(MARL_ROWS).any()
    assert set(table[table["budget"] == 0.3]["method"]) == set(HEURISTIC_ROWS)
    assert set(table[table["budget"] == 0.5]["method"]) == {*HEURISTIC_ROWS, "Cascade (greedy similarity)"}
    settings = json.loads((output / "results.json").read_text())["settings"]
    assert settings["checkpoints"] == {} and settings["prune_points"] == [1, 2, 3]
    assert settings["best_heuristic_chosen_on"] == "48 validation images"  # for the cascade row
    capsys.readouterr()
    for flags, message in ((["--heuristics-only", "--checkpoint", str(tmp_path)],
                            "--checkpoint names a policy checkpoint: --heuristics-only evaluates none"),
                           (["--prune-points", "1,2"], "--prune-points is for --heuristics-only"),
                           (["--heuristics-only", "--selection-images", "48"], "--selection-images chooses the "
                            "heuristic that learned rows and --cascade are compared with: --heuristics-only without "
                            "--cascade has none"),
                           (["--heuristics-only", "--backbone", str(tiny_backbone), "--prune-points", "1,9"],
                            f"error: --prune-points 1,9: backbone {tiny_backbone}: prune_points must be")):
        assert evaluate.main([*flags, "--output-dir", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    with pytest.raises(UsageError, match="--prune-points is for --heuristics-only"):  # as every bad argument
        evaluate.run(evaluate.build_parser().parse_args(["--prune-points", "1,2"]), {"prune_points"})


def test_command_line_exit_code(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(tmp_path / "nope"),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: checkpoint") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists()


EVALUATE_WITHOUT_RL_PACKAGES = HIDE_RL_PACKAGES + """
import evaluate

code = evaluate.main(sys.argv[1:])
sys.exit(code)
"""


def test_an_exported_policy_evaluates_without_ray_to_the_same_table(unexported_policy, tiny_policy, data_dir,
                                                                     tmp_path, capsys):
    """Inference needs torch, not Ray or gymnasium (a GPU box or a deployment image without them): evaluate.py
    runs a checkpoint's export with both unimportable, and the policy's plain-torch networks give the numbers
    the RLlib modules gave, which the same checkpoint without its export is evaluated with, after one warning
    line. The two runs have the same settings, so this also shows that an evaluation is deterministic: they write
    the same results.csv, to the byte."""
    unpickled = tmp_path / "unpickled"
    assert evaluate.main(cli(unexported_policy, data_dir, unpickled, "--budgets", "0.3,0.5", "--no-speed")) == 0
    # said once, in one line, as pickles run the code of whoever wrote them
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: {unexported_policy} has no export: its policies are read from RLlib's pickled files, which run "
        f"code of whoever wrote them (load only checkpoints you trust; python -m policies.export writes an export)"]
    output = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", EVALUATE_WITHOUT_RL_PACKAGES,
                           *cli(tiny_policy, data_dir, output, "--budgets", "0.3,0.5", "--no-speed")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table, expected = pd.read_csv(output / "results.csv"), pd.read_csv(unpickled / "results.csv")
    assert set(MARL_ROWS) <= set(table["method"])
    pd.testing.assert_frame_equal(table.drop(columns=TIMING), expected.drop(columns=TIMING))
    assert (output / "results.csv").read_text() == (unpickled / "results.csv").read_text()


def test_missing_default_checkpoint_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(evaluate, "DEFAULT_CHECKPOINT", tmp_path / "reference" / "marl_policy")
    assert evaluate.main(["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no policy checkpoint at") and "--checkpoint" in err and err.count("\n") == 1


def test_the_interval_of_a_difference_resamples_the_same_images_for_both_rows():
    """A method that fixes 4 of the reference's 8 errors on 64 images and changes nothing else is surely better:
    paired, every resample keeps that, so the interval lies above 0 (drawn independently, the two rows' own
    noise would put it around 0). The interval is the percentile bootstrap over resampled images."""
    reference = np.ones(64)
    reference[:8] = 0
    method = reference.copy()
    method[:4] = 1
    delta, low, high = paired_difference(method, reference)
    assert delta == pytest.approx(6.25) and 1.0 < low < delta < high < 15.0
    draws = np.random.default_rng(1).integers(0, 64, size=(4000, 64))  # the same images for both rows
    by_hand = 100 * np.percentile(method[draws].mean(axis=1) - reference[draws].mean(axis=1), [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(by_hand), abs=1.6)  # one image is 1.56 points
    assert paired_difference(reference, reference) == (0.0, 0.0, 0.0)  # paired: no resample differs


def test_the_interval_of_a_difference_on_many_images_is_the_normal_one():
    """On 2,000 images, where the bootstrap's interval is the normal one, it is the mean difference +- 1.96
    standard errors of the per-image differences: a method that fixes 40 of the reference's errors and makes 20
    new ones is 1.00 point better, within 0.76 points."""
    reference = np.ones(2000)
    reference[:300] = 0
    method = reference.copy()
    method[:40], method[1000:1020] = 1, 0
    delta, low, high = paired_difference(method, reference)
    differences = 100 * (method - reference)
    half_width = 1.96 * differences.std() / np.sqrt(len(differences))
    assert delta == pytest.approx(1.0) and half_width == pytest.approx(0.758, abs=1e-3)
    assert (low, high) == pytest.approx((delta - half_width, delta + half_width), abs=0.1)


def test_learned_rows_compare_with_the_best_heuristic_and_tome_at_their_budget(results):
    """Each learned row's differences are its accuracy minus that of its best heuristic and of ToMe at its budget,
    each inside its interval. Which heuristic is the best, and on which images it is chosen: the tests below."""
    table = results[1]
    heuristics = table[table["method"].isin(HEURISTIC_ROWS)]
    for _, row in table.iterrows():
        if row["method"] in MARL_ROWS:
            at_budget = heuristics[heuristics["budget"] == row["budget"]].set_index("method")["accuracy"]
            assert row["best_heuristic"] in at_budget.index
            assert row["delta_best_heuristic"] == pytest.approx(row["accuracy"] - at_budget[row["best_heuristic"]])
            assert row["delta_ci_low"] <= row["delta_best_heuristic"] <= row["delta_ci_high"]
            assert row["delta_tome"] == pytest.approx(row["accuracy"] - at_budget["ToMe"])
            assert row["delta_tome_ci_low"] <= row["delta_tome"] <= row["delta_tome_ci_high"]
        else:
            assert row[DELTA].isna().all()


def test_the_best_heuristic_is_the_most_accurate_on_the_validation_images_not_the_test_images(
        results, tiny_policy, data_dir, tmp_path, capsys):
    """A test run chooses it on --selection-images validation images (the first of equals in table order): a run
    on those very images (--split val, the same seeded subset) reads it as their most accurate heuristic."""
    output, table = results
    assert json.loads((output / "results.json").read_text())["settings"]["best_heuristic_chosen_on"] == \
        "48 validation images"
    on_val = tmp_path / "val"
    assert evaluate.main([*cli(tiny_policy, data_dir, on_val, "--budgets", "0.3,0.5", "--no-speed", "--split", "val"),
                          "--limit", "48"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == []  # an export warns of nothing
    val = pd.read_csv(on_val / "results.csv")
    heuristics = val[val["method"].isin(HEURISTIC_ROWS) & (val["budget"] == TARGET_RATIO)].set_index("method")
    chosen = table[table["method"].isin(MARL_ROWS)]["best_heuristic"]
    assert set(chosen) == {heuristics["accuracy"].idxmax()}
    # the run says how many of those images chose the checkpoint in train.py (the seeded subsets of the val split)
    problem = load_policies(tiny_policy)[1].problem
    ranked = len(np.intersect1d(limited_positions(problem.val_size, 48, problem.split_seed),
                                limited_positions(problem.val_size, problem.val_limit, problem.split_seed)))
    assert 0 < ranked < 48
    assert f"note: {ranked} of the 48 validation images evaluated ranked the checkpoints of " in err
    settings = json.loads((on_val / "results.json").read_text())["settings"]
    assert list(settings["checkpoint_ranking_images_evaluated"].values()) == [ranked]


def test_the_best_heuristic_is_chosen_on_the_selection_images(tiny_policy, tiny_staged, split):
    """Selection labels that greedy attention answers perfectly and test labels that greedy similarity answers
    perfectly: the learned rows are compared with greedy attention, the choice on the selection images."""
    staged, config = tiny_staged
    modules, info = load_policies(tiny_policy)
    methods = plan_methods([TARGET_RATIO], {TARGET_RATIO: (modules, info.problem)})

    def answered_by(selection: str) -> ImageSplit:
        model = PrunedViT(staged, config, selection, TARGET_RATIO)
        return ImageSplit(split.images, model(model.normalize(split.images)).argmax(1), split.class_names)

    selection, evaluated = answered_by("attention"), answered_by("similarity")
    models = {method: method.model(staged, config, "merge", 0) for method in methods}
    on_test = best_heuristics(predict(models, evaluated, 24), evaluated.labels)
    assert on_test[TARGET_RATIO][0].name == "Greedy similarity"  # what a choice on the test images would be
    table = evaluate_methods(staged, config, evaluated, methods, "merge", batch_size=24, speed_repeats=None,
                             progress=False, selection=selection).table
    assert set(table[table["method"].isin(MARL_ROWS)]["best_heuristic"]) == {"Greedy attention"}


def test_tome_row_costs_what_the_dearest_row_at_its_budget_costs(results, tiny_staged):
    """The agents' row where the policy is evaluated (its networks cost more than any heuristic's features)."""
    table = results[1]
    for budget in (0.3, TARGET_RATIO):
        at_budget = table[table["budget"] == budget].set_index("method")
        others = at_budget.drop(index="ToMe")["gflops"]
        assert at_budget.loc["ToMe", "gflops"] == pytest.approx(others.max(), rel=0.03)
        assert at_budget.loc["ToMe", "gflops_features"] == 0 and at_budget.loc["ToMe", "keep_ratio_s1"] < 1
    at_policy = table[table["budget"] == TARGET_RATIO].set_index("method").drop(index="ToMe")
    assert at_policy["gflops"].idxmax() == "MARL exact"


def test_tome_matched_to_more_than_the_unpruned_cost_is_said_to_merge_nothing(tiny_staged, monkeypatch):
    """On a ViT small beside the agents' networks, the row ToMe is matched to costs more than the unpruned model:
    ToMe then merges nothing, which the command says in a warning rather than show the unpruned model as ToMe."""
    staged, config = tiny_staged
    methods = [Method("Greedy similarity", "similarity", TARGET_RATIO),
               Method("ToMe", "tome", TARGET_RATIO)]
    unpruned = Method("Baseline", "baseline").model(staged, config, "merge").gflops().total
    model = Method.model
    warnings_seen = []
    for cost in (unpruned * 0.6, unpruned * 0.999, unpruned * 1.01):  # 0.999: closest to merging nothing
        monkeypatch.setattr(Method, "model", lambda self, *args, cost=cost: (
            model(self, *args) if self.selection == "tome" else SimpleNamespace(
                gflops=lambda: SimpleNamespace(total=cost))))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tome = match_tome_cost(methods, staged, config, "merge")[1]
        said = [str(w.message).startswith(f"ToMe at {TARGET_RATIO:g} is the unpruned model: the rows it is "
                                          f"matched to cost ") for w in caught]
        merged = tome.model(staged, config, "merge").gflops().total
        assert said == ([True] if merged == pytest.approx(unpruned) else []) and tome.tome_gflops == cost
        warnings_seen.append(bool(said))
    assert warnings_seen == [False, True, True]


def test_cascade_row_is_the_cascade_calibrated_on_validation_images(tiny_policy, tiny_staged, data_dir, split,
                                                                   tmp_path, capsys):
    output = tmp_path / "out"
    assert evaluate.main(cli(tiny_policy, data_dir, output, "--budgets", "0.5", "--no-speed", "--cascade", "0.8,0.3",
                             "--cascade-points", "1,3", "--calibration-images", "48")) == 0
    points = ",".join(map(str, PRUNE_POINTS))
    assert (f"note: no MARL cascade row: the agents of {tiny_policy} prune at {points}, the cascade at 1,3 "
            f"(--cascade-points {points} runs them in it)\n") in capsys.readouterr().err
    table = pd.read_csv(output / "results.csv").set_index("method")
    row = table.loc["Cascade (greedy similarity)"]
    assert row["budget"] == TARGET_RATIO and row[["keep_ratio_s1", "keep_ratio"]].isna().all()
    assert row["best_heuristic"] in HEURISTIC_ROWS  # never the cascade itself
    assert row["delta_best_heuristic"] == pytest.approx(row["accuracy"] - table.loc[row["best_heuristic"], "accuracy"])

    staged, config = tiny_staged
    stages = StagedViT(staged.vit, (1, 3))
    cascade = CascadeViT(*(PrunedViT(stages, config, "similarity", ratio) for ratio in (0.8, 0.3)))
    calibration = load_split("cifar10", "val", data_dir, input_size=32, limit=48)
    cascade.calibrate([cascade.normalize(calibration.images)], table.loc["Greedy similarity", "gflops"])
    logits, kept = cascade.forward_with_kept(cascade.normalize(split.images))
    assert row["accuracy"] == pytest.approx(100 * (logits.argmax(1) == split.labels).float().mean().item())
    assert row["gflops"] == pytest.approx(cascade.mean_gflops(kept).total)
    assert 0 < cascade.reran(kept).float().mean() < 1
    settings = json.loads((output / "results.json").read_text())["settings"]
    assert settings["cascade"] == {"prune_points": [1, 3], "ratios": [0.8, 0.3], "calibration_images": 48}
    assert "MARL cascade" not in table.index  # the agents were trained on other pruning points


def test_marl_cascade_row_is_the_agents_in_the_cascade_and_answers_to_greedy_similaritys(tiny_policy, tiny_staged,
                                                                                          data_dir, split, tmp_path):
    output = tmp_path / "out"
    assert evaluate.main(cli(tiny_policy, data_dir, output, "--budgets", "0.5", "--no-speed", "--cascade", "0.8,0.3",
                             "--cascade-points", ",".join(map(str, PRUNE_POINTS)), "--calibration-images", "48")) == 0
    table = pd.read_csv(output / "results.csv").set_index("method")
    assert list(table.index[6:]) == ["ToMe", "Cascade (greedy similarity)", "MARL exact", "MARL cascade",
                                     "MARL attention only", "MARL similarity only"]
    heuristics = table.loc[[*HEURISTIC_ROWS, "Cascade (greedy similarity)"], "accuracy"]
    for learned in ("MARL exact", "MARL cascade"):
        best = table.loc[learned, "best_heuristic"]
        assert best == table.loc["MARL exact", "best_heuristic"]  # one reference per budget
        assert table.loc[learned, "delta_best_heuristic"] == pytest.approx(table.loc[learned, "accuracy"]
                                                                           - heuristics[best])

    modules, info = load_policies(tiny_policy)
    cascade = CascadeViT(*(PrunedViT(tiny_staged[0], tiny_staged[1], modules, ratio,
                                     protected_share=info.problem.protected_share) for ratio in (0.8, 0.3)))
    calibration = load_split("cifar10", "val", data_dir, input_size=32, limit=48)
    cascade.calibrate([cascade.normalize(calibration.images)], table.loc["Greedy similarity", "gflops"])
    logits, kept = cascade.forward_with_kept(cascade.normalize(split.images))
    assert table.loc["MARL cascade", "accuracy"] == pytest.approx(
        100 * (logits.argmax(1) == split.labels).float().mean().item())
    assert table.loc["MARL cascade", "gflops"] == pytest.approx(cascade.mean_gflops(kept).total)
    assert table.loc["MARL cascade", "gflops_policies"] > 0


def test_training_validation_scores_the_modes_evaluate_reports(tiny_policy, tiny_staged, split):
    """train.py selects checkpoints by PruningEngine.validate: it must be evaluate.py's MARL rows."""
    modules, info = load_rllib_policies(tiny_policy)  # the RLlib modules, which train.py validates
    model, config = tiny_staged
    engine = PruningEngine(model, config, split.images, split.labels, TARGET_RATIO, "merge")
    scores = engine.validate(modules, info.problem.protected_share)
    images = normalize(split.images, config)
    with torch.no_grad():
        reference = model.vit(images).argmax(1)
        method = plan_methods([], {TARGET_RATIO: (modules, info.problem)})[-3]
        assert method.name == "MARL exact"
        logits, _ = method.model(model, config, "merge").forward_with_kept(images)
    assert scores["exact_accuracy"] == pytest.approx(100 * (logits.argmax(1) == split.labels).double().mean())
    assert scores["exact_agreement"] == pytest.approx(100 * (logits.argmax(1) == reference).double().mean())


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_results_that_cannot_all_be_written_leave_the_output_directory_as_it_was(tmp_path, monkeypatch, failure):
    """A full disk or an interrupt while the plot, the last file, is written left the new tables beside an earlier
    run's plot, or half of a results.json, and a full disk was a traceback; now nothing of the run is written, and
    a full disk is one line. A directory the writing made goes again."""
    settings = {"prune_points": [1, 2, 3]}
    rows = {"method": ["Random", "Random"], "budget": [0.3, 0.5], "gflops": [0.2, 0.1], "accuracy": [80.0, 70.0]}
    earlier = write_results(pd.DataFrame(rows), tmp_path / "out", settings)
    before = {path.name: path.read_bytes() for path in earlier}

    def fail(table, path):
        Path(path).write_bytes(b"half a plot")
        raise failure

    monkeypatch.setattr(results_table, "plot_accuracy_vs_gflops", fail)
    later = pd.DataFrame({**rows, "accuracy": [81.0, 71.0]})
    for output_dir in (tmp_path / "out", tmp_path / "new" / "out"):
        with pytest.raises(type(failure)) as raised:
            write_results(later, output_dir, settings)
        if isinstance(failure, OSError):
            assert isinstance(raised.value, UserError) and str(raised.value) == (
                f"cannot write the results to {output_dir} ([Errno 28] No space left on device); nothing was "
                f"written there: the table above is this run's")
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before
    assert not (tmp_path / "new").exists()


def test_a_cascade_dearer_than_its_budget_is_warned_of():
    """Calibrated on few images and evaluated on few others, a cascade cost 27% more than the GFLOPs it was
    calibrated to, without a word; within 5% of them (the committed run's 1%) it is not warned of."""
    table = pd.DataFrame({"method": ["Greedy similarity", "Cascade (greedy similarity)", "MARL cascade"],
                          "budget": [0.5, 0.5, 0.5], "gflops": [0.1733, 0.2209, 0.175]})
    passes = CascadePasses((1, 3), (0.35, 0.1), threshold=0.2, target_gflops=0.1733)
    methods = [Method("Greedy similarity", "similarity", 0.5),
               Method("Cascade (greedy similarity)", "cascade", 0.5, cascade=passes),
               Method("MARL cascade", "cascade", 0.5, cascade=passes)]
    with pytest.warns(UserWarning) as warned:
        warn_of_dear_cascades(table, methods)
    assert [str(warning.message) for warning in warned] == [
        "Cascade (greedy similarity) at 0.5 cost 0.2209 GFLOPs, 27% above the 0.1733 it was calibrated to: more "
        "images ran twice than in calibration (more --calibration-images or more evaluated images narrow the gap)"]


def test_an_interrupt_while_the_results_are_moved_into_place_comes_after_and_says_so(tmp_path, monkeypatch):
    """Ctrl-C amid the moves waits for the last one, then says the results were written (the command's usual
    line says nothing was)."""
    settings = {"prune_points": [1, 2, 3]}
    rows = {"method": ["Random", "Random"], "budget": [0.3, 0.5], "gflops": [0.2, 0.1], "accuracy": [80.0, 70.0]}
    replace = os.replace

    def interrupted_replace(source, target):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a handler would have run by now
        replace(source, target)

    monkeypatch.setattr(results_table.os, "replace", interrupted_replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it (not nohup)
    try:
        with pytest.raises(KeyboardInterrupt, match=f"^interrupted once the results were written to {tmp_path}$"):
            write_results(pd.DataFrame(rows), tmp_path, settings)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "accuracy_vs_gflops.png", "results.csv", "results.json", "results.md"]


def test_results_record_paths_inside_the_repository_relative_to_it(tmp_path):
    assert repository_relative(evaluate.DEFAULT_CHECKPOINT) == "reference/marl_policy"
    assert repository_relative(tmp_path / "policy") == str(tmp_path / "policy")


def test_results_remove_an_older_plot_and_predictions_they_do_not_have(tmp_path):
    """A plot of several budgets or predictions left by an earlier run would not belong to the new results."""
    settings = {"prune_points": [1, 2, 3]}
    rows = {"method": ["Random", "Random"], "budget": [0.3, 0.5], "gflops": [0.2, 0.1], "accuracy": [80.0, 70.0]}
    predictions = pd.DataFrame({"label": [1, 2], "Random @ 0.3": [1, 0], "Random @ 0.5": [2, 2]})
    assert {tmp_path / "accuracy_vs_gflops.png", tmp_path / "predictions.csv.gz"} <= set(
        write_results(pd.DataFrame(rows), tmp_path, settings, predictions))
    first = (tmp_path / "predictions.csv.gz").read_bytes()
    write_results(pd.DataFrame(rows), tmp_path, settings, predictions)
    assert (tmp_path / "predictions.csv.gz").read_bytes() == first  # no time in its gzip header
    written = write_results(pd.DataFrame(rows).iloc[1:], tmp_path, settings)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in written) == [
        "results.csv", "results.json", "results.md"]
