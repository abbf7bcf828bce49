"""The results table of evaluate.py: its columns, defined once, and how it is written (CSV, JSON, Markdown,
a plot of accuracy against GFLOPs)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from envs.atomic_file import first_missing, interrupts_held
from envs.errors import UserError

SPEED_BATCH_SIZES: tuple[int, ...] = (1, 256)
"""The batch sizes timed by default (evaluate.py's ``--speed-batch-sizes``), one ``images_per_s_b{n}`` column
each; the committed results have these two."""
SPEED_MIN_IMAGES = 8
"""The fewest images a timed pass runs: at batch 1, eight one at a time, so one call's noise is not the
measurement."""
BASELINE = "Baseline (unpruned)"
"""The unpruned row: the reference of ``agreement`` and ``speedup``."""

COLUMNS: dict[str, str] = {  # the results table's columns, in order; keep_ratio_s{i} repeats per pruning point,
    # images_per_s_b{n} per batch size timed
    "method": "how tokens are chosen (see evaluate.py's docstring)",
    "budget": "target_ratio: fraction of live patch tokens removed at each pruning point (blank: unpruned)",
    "accuracy": "top-1 accuracy vs the labels, %",
    "f1_macro": "macro F1 over the classes present, %",
    "agreement": "images with the same argmax as the unpruned model, %",
    "gflops": "GMACs per image: gflops_backbone + gflops_features + gflops_policies",
    "gflops_backbone": "GMACs of the ViT on each image's own token schedule (merging included), mean over images",
    "gflops_features": "GMACs of the token scores the method needs (class-attention row, norms, cosine matrix)",
    "gflops_policies": "GMACs of the policy networks, each run on every live token (the similarity network on "
                       "those the attention agent kept too, whose scores it does not use)",
    "keep_ratio_s{i}": "mean fraction of the patch tokens alive in stage {i} (after pruning point {i}); ToMe, "
                       "which merges in every block: entering stage {i}",
    "keep_ratio": "mean fraction of the patch tokens alive in the last stage (ToMe: entering it); the keep "
                  "ratios are blank for cascade rows, whose images run one forward or two",
    "images_per_s_b{n}": "images/s in batches of {n}: the median over rounds that each time every row once, in "
                         f"turns, a pass of whole batches and at least {SPEED_MIN_IMAGES} images, on settings.device "
                         "in settings.dtype, after a warm-up round (features and policies included, input "
                         "normalisation excluded; settings.speed_images says which images)",
    "speedup": "{largest} / the Baseline's in the same round, median over the rounds: at the largest batch size "
               "timed",
    "best_heuristic": "learned and cascade rows: the heuristic row at the same budget (ToMe and greedy "
                      "similarity's cascade included) most accurate on validation images "
                      "(settings.best_heuristic_chosen_on; with --split val, the evaluated ones), never on the "
                      "test images compared",
    "delta_best_heuristic": "learned and cascade rows: accuracy minus best_heuristic's, points",
    "delta_ci_low": "lower end of the paired bootstrap 95% interval of delta_best_heuristic (same images)",
    "delta_ci_high": "upper end of that interval",
    "delta_tome": "learned and cascade rows: accuracy minus ToMe's at the same budget (ToMe at the cost nearest "
                  "the dearest row's), points",
    "delta_tome_ci_low": "lower end of the paired bootstrap 95% interval of delta_tome (same images)",
    "delta_tome_ci_high": "upper end of that interval",
}


HEADER_SETTINGS = ("dataset", "split", "images", "device", "dtype", "compiled", "speed_images")
"""The settings printed and written above the table, so that a table copied alone still names the machine and
precision it was measured in."""


def speed_column(batch_size: int) -> str:
    """The images/s column of ``batch_size``: ``images_per_s_b256``."""
    return f"images_per_s_b{batch_size}"


def column_docs(num_points: int, batch_sizes: Sequence[int] = SPEED_BATCH_SIZES) -> dict[str, str]:
    """:data:`COLUMNS` with one ``keep_ratio_s{i}`` per pruning point and one ``images_per_s_b{n}`` per batch
    size timed."""
    docs = {}
    for column, doc in COLUMNS.items():
        values = ([{"i": i} for i in range(1, num_points + 1)] if "{i}" in column else
                  [{"n": n} for n in batch_sizes] if "{n}" in column else [{}])
        docs.update({column.format(**value): doc.format(largest=speed_column(max(batch_sizes)), **value)
                     for value in values})
    return docs


def header_line(settings: Mapping[str, Any]) -> str:
    """The :data:`HEADER_SETTINGS` among ``settings``, one line: ``dataset: cifar10; ...; device: cpu; ...``."""
    return "; ".join(f"{key}: {settings[key]}" for key in HEADER_SETTINGS if settings.get(key) is not None)


def _format(column: str, value: Any) -> str:
    """A cell of the Markdown table: blank for missing values, sensible precision per column."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    formats = {"gflops": "{:.4g}", "budget": "{:g}", "keep_ratio": "{:.3f}", "images_per_s": "{:.1f}"}
    return next((f.format(value) for prefix, f in formats.items() if column.startswith(prefix)), f"{value:.2f}")


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown, numbers right-aligned, without the columns that no row fills (the timings of
    ``--no-speed``, the comparisons of a table without learned rows): results.csv keeps every column."""
    table = table.dropna(axis="columns", how="all")
    cells = pd.DataFrame({column: [_format(column, v) for v in table[column]] for column in table.columns})
    return cells.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                             colalign=["left"] + ["right"] * (len(cells.columns) - 1))


def plot_accuracy_vs_gflops(table: pd.DataFrame, path: Path) -> None:
    """Accuracy against GFLOPs, one line per method across budgets (Agg-safe: no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for name, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("gflops")
        baseline = name == BASELINE
        axes.plot(rows["gflops"], rows["accuracy"], marker="*" if baseline else "o", markersize=12 if baseline else 5,
                  linestyle="-" if len(rows) > 1 else "none", label=name)
    axes.set_xlabel("GFLOPs per image (backbone + features + policies)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)


TABLE_FILES = ("results.csv", "results.json", "results.md")
PREDICTIONS_FILE = "predictions.csv.gz"
PLOT_FILE = "accuracy_vs_gflops.png"
RESULT_FILES = (*TABLE_FILES, PREDICTIONS_FILE, PLOT_FILE)
"""What :func:`write_results` writes in its directory (the predictions when it is given them, the plot with more
than one budget only)."""


def prediction_column(method: str, budget: float | None) -> str:
    """The column of a table row's predicted classes in :data:`PREDICTIONS_FILE`: ``Greedy similarity @ 0.5``,
    or the method alone for the unpruned row, which has no budget (None, or NaN as results.csv reads back)."""
    return method if budget is None or math.isnan(budget) else f"{method} @ {budget:g}"


class ResultsNotWritten(UserError, OSError):
    """The results could not be written (a full disk, say); the message says what the output directory holds."""


def write_results(table: pd.DataFrame, output_dir: Path, settings: Mapping[str, Any],
                  predictions: pd.DataFrame | None = None) -> list[Path]:
    """results.csv, results.json, results.md, with ``predictions`` predictions.csv.gz (every image's label and
    each row's answer, ``evaluation.predictions.per_image_predictions``) and, with more than one budget,
    accuracy_vs_gflops.png. An older predictions file or plot is removed otherwise: it would not belong to these
    results. The files are written into a staging directory inside ``output_dir``, then moved into place with
    interrupts held back (:func:`envs.atomic_file.interrupts_held`), so that a full disk
    (:class:`ResultsNotWritten`) or an interrupt while writing leaves ``output_dir`` as it was: never part of a
    run's files, nor an earlier run's beside them, nor a directory that only this made."""
    made, staging = first_missing(output_dir), None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".results-", dir=output_dir))
        staged = _write_files(table, staging, settings, predictions)
    except BaseException as error:  # an interrupt too
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if made is not None and not any(path.is_file() for path in made.rglob("*")):
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(error, OSError):
            raise ResultsNotWritten(f"cannot write the results to {output_dir} ({error}); nothing was written "
                                    f"there: the table above is this run's") from None
        raise
    try:
        with interrupts_held():
            try:
                for name in {PREDICTIONS_FILE, PLOT_FILE} - {path.name for path in staged}:
                    (output_dir / name).unlink(missing_ok=True)
                for path in staged:
                    os.replace(path, output_dir / path.name)
            except OSError as error:  # a move within one directory: next to never
                raise ResultsNotWritten(f"cannot move the results into {output_dir} ({error}): it may hold some "
                                        f"of this run's files beside an earlier run's; the table above is this "
                                        f"run's") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except KeyboardInterrupt:  # held back until every file was in place (cli.run_command prints its line)
        raise KeyboardInterrupt(f"interrupted once the results were written to {output_dir}") from None
    return [output_dir / path.name for path in staged]


def _write_files(table: pd.DataFrame, directory: Path, settings: Mapping[str, Any],
                 predictions: pd.DataFrame | None) -> list[Path]:
    """:func:`write_results`' files, written into ``directory``; their paths."""
    docs = column_docs(len(settings["prune_points"]), settings.get("speed_batch_sizes", SPEED_BATCH_SIZES))
    records = table.astype(object).where(table.notna(), None).to_dict("records")
    paths = [directory / name for name in TABLE_FILES]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(json.dumps({"settings": settings, "columns": docs, "rows": records}, indent=2) + "\n")
    legend = "\n".join(f"- `{column}`: {doc}" for column, doc in docs.items())
    setting_lines = "\n".join(f"- {key}: `{value}`" for key, value in settings.items())
    paths[2].write_text(f"# Token pruning results\n\n{header_line(settings)}\n\n{markdown_table(table)}\n\n"
                        f"## Columns\n\n{legend}\n\n"
                        f"## Settings\n\n{setting_lines}\n")
    if predictions is not None:
        paths.append(directory / PREDICTIONS_FILE)
        predictions.to_csv(paths[-1], compression={"method": "gzip", "mtime": 0})  # the same bytes again
    if table["budget"].nunique() > 1:
        paths.append(directory / PLOT_FILE)
        plot_accuracy_vs_gflops(table, paths[-1])
    return paths
