"""Evaluate trained token-pruning policies against baselines; print and save the results table.

No Ray cluster: only the two RLModules are loaded from an RLlib checkpoint, and the pruned ViT runs here,
in batches. One row per method and budget (``budget`` = ``target_ratio``, see docs/DESIGN.md):

- ``Baseline (unpruned)``: the timm model's own forward.
- ``Random``, ``Greedy attention`` (top-k class attention, EViT), ``Greedy similarity``
  (``policies.heuristics``): exact budget, at every budget of ``--budgets`` and of the checkpoints.
- ``MARL exact``: both agents; tokens ranked by ``p_keep * (1 - p_redundant)`` (each ``p`` the sigmoid of
  a module's logit), the top ``tokens_to_keep`` survive each pruning point.
- ``MARL adaptive``: both agents, deterministic: each image keeps its policies' expected number of
  survivors, ``round(sum p_keep * (1 - p_redundant))`` (at least 1), the most likely ones; counts differ
  per image (docs/DESIGN.md).
- ``MARL attention only`` / ``MARL similarity only``: one module of the pair alone, exact budget,
  ranked by ``p_keep`` / ``1 - p_redundant``. A checkpoint trained with one agent gives only its row.
MARL rows come at the checkpoint's own ``target_ratio``, and at the budgets of ``--checkpoints-per-budget``.
Every pruned row removes tokens the same way, the checkpoint's ``reduction`` unless ``--reduction`` says
otherwise (``envs.token_merge``: ``merge`` averages them into the most similar kept token, ``drop``
discards them).

Columns (also written, with these definitions, to results.md and results.json):

- ``accuracy``, ``f1_macro`` (sklearn, macro over the classes present), ``agreement`` (same argmax as the
  unpruned model): all in percent.
- ``gflops``: mean per image of ``gflops_backbone + gflops_features + gflops_policies``, in GMACs
  (``envs.flops``). ``gflops_backbone`` is exact per image (each image's own token schedule, then the mean),
  merging included (``envs.flops.merge_gflops``). ``gflops_features`` counts what the method needs at each
  pruning point with ``n`` live tokens: Random 0; Greedy attention the class-attention row ``n*D``; Greedy
  similarity token norms and the cosine matrix ``n*D + n^2*D`` (its iterative removal is comparisons, like
  softmax not counted); MARL rows the full ``envs.features`` cost ``2*n*D + n^2*D`` (both agents' features are
  computed, also for the single-agent rows). ``gflops_policies``: ``policies.rl_module.policy_gflops`` on the
  live tokens, per module used. Not counted: the class-attention row ``StagedViT`` also computes after the
  last stage (unused, ``n*D``, ~1e-5 GFLOPs here).
- ``keep_ratio_s1 .. keep_ratio_sK``: mean over images of the fraction of the ``N`` patch tokens alive in
  stage ``i`` (after pruning point ``i``; stage 0 always has all); ``keep_ratio``: the same for the last
  stage, i.e. the overall fraction that reaches the head.
- ``images_per_s_b1`` / ``images_per_s_b256``: throughput of the whole pruned forward (features and
  policies included, input normalisation excluded), in this process and with these threads: median of
  ``--speed-repeats`` timed passes after one warm-up pass, over 8 images one at a time / one batch of 256
  (the split's images, repeated when it has fewer). ``speedup``: ``images_per_s_b256`` / the Baseline's.
  Empty with ``--no-speed``.

Numbers other than timings are deterministic for the same inputs, ``--seed`` and ``--batch-size``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from sklearn.metrics import f1_score
from tqdm import tqdm

from envs.backbone_checkpoint import REFERENCE_BACKBONE, CheckpointError, load_backbone, normalize, stored_backbone_path
from envs.cli import OneLineParser, UsageError
from envs.data import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_SIZE,
    SPLITS,
    DataError,
    ImageSplit,
    default_data_dir,
    load_split,
)
from envs.features import token_features
from envs.flops import ViTSpec, backbone_gflops, feature_gflops, merge_gflops, schedule_tokens
from envs.pruned_forward import PruneContext, adaptive_forward, pruned_forward
from envs.staged_vit import StagedViT
from envs.token_merge import REDUCTIONS
from envs.token_ops import topk_keep_index
from policies.checkpoints import Modules, PolicyCheckpointError, check_policies, checkpoint_agents, load_policies
from policies.heuristics import make_selector
from policies.rl_module import policy_gflops

REPO = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO / "reference" / "marl_policy"
SPEED_BATCH = 256
SPEED_SINGLE_IMAGES = 8
ADAPTIVE_MAX_PADDING = 0.0  # regroup adaptive batches by exact kept count: no compute on padding

BASELINE = "Baseline (unpruned)"
RANDOM = "Random"
GREEDY_ATTENTION = "Greedy attention"
GREEDY_SIMILARITY = "Greedy similarity"
MARL_EXACT = "MARL exact"
MARL_ADAPTIVE = "MARL adaptive"
MARL_ONLY = {"attention": "MARL attention only", "similarity": "MARL similarity only"}

TIMING_COLUMNS = ("images_per_s_b1", "images_per_s_b256", "speedup")
COLUMN_DOCS = {
    "method": "how tokens are chosen (see evaluate.py's docstring)",
    "budget": "target_ratio: fraction of live patch tokens removed at each pruning point (blank: unpruned)",
    "accuracy": "top-1 accuracy vs the labels, %",
    "f1_macro": "macro F1 over the classes present, %",
    "agreement": "images with the same argmax as the unpruned model, %",
    "gflops": "GMACs per image: gflops_backbone + gflops_features + gflops_policies",
    "gflops_backbone": "GMACs of the ViT on each image's own token schedule, mean over images",
    "gflops_features": "GMACs of the token scores the method needs (class-attention row, norms, cosine matrix)",
    "gflops_policies": "GMACs of the policy networks on the live tokens",
    "keep_ratio_s{i}": "mean fraction of the patch tokens alive in stage {i} (after pruning point {i})",
    "keep_ratio": "mean fraction of the patch tokens alive in the last stage",
    "images_per_s_b1": f"images/s, one at a time ({SPEED_SINGLE_IMAGES} images), median of repeats",
    "images_per_s_b256": f"images/s, one batch of {SPEED_BATCH}, median of repeats",
    "speedup": "images_per_s_b256 / the Baseline's",
}

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Normalised images ``[B, C, H, W]`` -> logits ``[B, classes]`` and ``kept [B, num_stages]``."""


class EvaluationError(RuntimeError):
    """A bad argument, checkpoint or combination of them; the message is meant for the user as is."""


# -- checkpoints ---------------------------------------------------------------------------------------


def resolve_backbone(config: Mapping[str, Any] | None, override: str | None) -> Path:
    """``--backbone``, else the checkpoint's (relative paths there are relative to the repo), else the
    reference backbone."""
    if override:
        return Path(override).expanduser()
    if config is not None:
        return stored_backbone_path(config["server"]["backbone"])
    return REFERENCE_BACKBONE


def make_staged(vit: torch.nn.Module, prune_points: Sequence[int], source: str) -> StagedViT:
    """The backbone split at the checkpoint's pruning points, or a clear error naming ``source``."""
    try:
        return StagedViT(vit, tuple(prune_points)).eval()
    except (TypeError, ValueError) as error:
        raise EvaluationError(f"{source}: {error}") from None


# -- methods ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Method:
    """One row of the table: how tokens are chosen and at which budget.

    ``selector``: ``baseline``, a heuristic of ``policies.heuristics`` (``random``, ``attention``,
    ``similarity``) or ``policy`` (``modules`` score the tokens; ``adaptive`` = their own decisions).
    """

    name: str
    selector: str
    budget: float | None = None
    modules: Modules = field(default_factory=dict)
    adaptive: bool = False


def plan_methods(budgets: Sequence[float], policies: Mapping[float, tuple[Modules, str]]) -> list[Method]:
    """Rows in table order: the baseline, then per budget the heuristics and the MARL rows there.

    ``policies`` maps a budget to ``(modules, agents)`` of the checkpoint evaluated at it. Heuristics run
    at every budget of ``budgets`` and of ``policies``, so each MARL row has baselines beside it.
    """
    methods = [Method(BASELINE, "baseline")]
    for budget in sorted(set(budgets) | set(policies)):
        methods += [Method(RANDOM, "random", budget), Method(GREEDY_ATTENTION, "attention", budget),
                    Method(GREEDY_SIMILARITY, "similarity", budget)]
        if budget not in policies:
            continue
        modules, agents = policies[budget]
        if agents == "both":
            methods += [Method(MARL_EXACT, "policy", budget, modules),
                        Method(MARL_ADAPTIVE, "policy", budget, modules, adaptive=True)]
        methods += [Method(MARL_ONLY[name], "policy", budget, {name: modules[name]}) for name in modules]
    return methods


# -- pruned forwards with the policies ------------------------------------------------------------------


def policy_logits(modules: Modules, ctx: PruneContext, staged: StagedViT,
                  target_ratio: float) -> dict[str, torch.Tensor]:
    """Each module's per-token logits ``[B, n]`` at one pruning point, from the engine's features.

    Row ``i`` is the ``i``-th live token in image order (live tokens are packed first). The rows are cut
    to the widest image of the batch instead of padded to ``N``: the module treats tokens independently
    apart from a mean over live rows, so dead rows change nothing (tests/test_evaluate.py checks this).
    """
    attention, similarity = token_features(ctx.x_patch, ctx.cls_attention, ctx.live, ctx.positions,
                                           staged.grid_size, ctx.stage, len(staged.prune_points),
                                           1.0 - target_ratio)
    features = {"attention": attention, "similarity": similarity}
    live = ctx.live.float()
    return {name: module.forward_inference({Columns.OBS: {"tokens": features[name], "live": live}})[
        Columns.ACTION_DIST_INPUTS] for name, module in modules.items()}


def survival_score(logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``log(p_keep * (1 - p_redundant))`` (the factors of the modules present): the exact-budget ranking.

    Logs of sigmoids rank like the product but do not saturate into ties.
    """
    score = 0.0
    if "attention" in logits:
        score = score + F.logsigmoid(logits["attention"])
    if "similarity" in logits:
        score = score + F.logsigmoid(-logits["similarity"])
    return score


def survival_decision(logits: Mapping[str, torch.Tensor], live: torch.Tensor) -> torch.Tensor:
    """Adaptive mode: each image keeps its policies' expected number of survivors, the most likely ones.

    The agents were trained sampling independent Bernoulli decisions, so an image's own budget is the
    expected survivor count ``round(sum p_keep * (1 - p_redundant))`` over its live tokens (at least 1);
    thresholding each probability at 0.5 instead would describe a policy that was never trained.
    """
    score = survival_score(logits).masked_fill(~live, float("-inf"))
    count = (score.exp().sum(dim=1).round().clamp(min=1)).long()
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    return (rank < count[:, None]) & live


def make_runner(method: Method, staged: StagedViT, seed: int = 0, reduction: str = "merge") -> Runner:
    """The pruned forward of ``method``; a fresh seeded generator makes Random repeatable."""
    num_stages = staged.num_stages

    def exact(select) -> Runner:
        def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, kept = pruned_forward(staged, images, select, method.budget, reduction)
            return logits, torch.tensor(kept).expand(len(images), num_stages)
        return run

    if method.selector == "baseline":
        return lambda images: (staged.vit(images),
                               torch.full((len(images), num_stages), staged.num_patches))
    if method.selector != "policy":
        return exact(make_selector(method.selector, torch.Generator().manual_seed(seed)))
    if method.adaptive:
        def decide(ctx: PruneContext) -> torch.Tensor:
            return survival_decision(policy_logits(method.modules, ctx, staged, method.budget), ctx.live)
        return lambda images: adaptive_forward(staged, images, decide, ADAPTIVE_MAX_PADDING, reduction)

    def select(ctx: PruneContext) -> torch.Tensor:
        score = survival_score(policy_logits(method.modules, ctx, staged, method.budget))
        return topk_keep_index(score, ctx.live, ctx.k)
    return exact(select)


# -- measurements ---------------------------------------------------------------------------------------


@torch.inference_mode()
def predict(runner: Runner, split: ImageSplit, backbone_config: Mapping[str, Any], batch_size: int,
            bar: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes ``[n]`` and kept tokens ``[n, num_stages]`` over the whole split."""
    predictions, kept = [], []
    for start in range(0, len(split), batch_size):
        images = normalize(split.images[start:start + batch_size], backbone_config)
        logits, batch_kept = runner(images)
        predictions.append(logits.argmax(dim=1).cpu())
        kept.append(batch_kept.cpu())
        if bar is not None:
            bar.update()
    return torch.cat(predictions), torch.cat(kept)


def quality(predictions: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro F1 and agreement with the unpruned predictions, in percent."""
    y_true, y_pred = labels.numpy(), predictions.numpy()
    return {"accuracy": 100.0 * float((y_pred == y_true).mean()),
            "f1_macro": 100.0 * float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "agreement": 100.0 * float((predictions == reference).float().mean())}


def _feature_gflops(selector: str, spec: ViTSpec, live_per_point: Sequence[int]) -> float:
    """GMACs of the token scores ``selector`` needs at pruning points with these live counts."""
    d = spec.embed_dim
    if selector == "attention":
        return sum(n * d for n in live_per_point) / 1e9
    if selector == "similarity":
        return sum(n * d + n * n * d for n in live_per_point) / 1e9
    if selector == "policy":
        return feature_gflops(spec, live_per_point)
    return 0.0


def _policy_gflops(modules: Modules, live_per_point: Sequence[int]) -> float:
    """GMACs of every module used, at each pruning point, on its live tokens."""
    total = 0.0
    for module in modules.values():
        first = module.token_net[0]  # the widths the module was built with
        total += sum(policy_gflops(n, first.in_features, first.out_features) for n in live_per_point)
    return total


def method_gflops(method: Method, staged: StagedViT, kept: torch.Tensor,
                  reduction: str = "merge") -> dict[str, float]:
    """Mean per-image GMACs (backbone with merging, features, policies) from each image's own token schedule."""
    spec = ViTSpec.from_model(staged.vit)
    schedules, counts = torch.unique(kept, dim=0, return_counts=True)
    totals = np.zeros(3)
    for schedule, count in zip(schedules.tolist(), counts.tolist(), strict=True):
        live_per_point = schedule[:-1] if method.selector != "baseline" else []
        merging = merge_gflops(spec, live_per_point, schedule[1:]) if reduction == "merge" and live_per_point else 0.0
        parts = (backbone_gflops(spec, schedule_tokens(spec, staged.prune_points, schedule)) + merging,
                 _feature_gflops(method.selector, spec, live_per_point),
                 _policy_gflops(method.modules, live_per_point))
        totals += np.asarray(parts) * count
    backbone, features, policies = totals / len(kept)
    return {"gflops": backbone + features + policies, "gflops_backbone": backbone,
            "gflops_features": features, "gflops_policies": policies}


def keep_ratios(kept: torch.Tensor, num_patches: int) -> dict[str, float]:
    """Mean fraction of the patch tokens alive in each stage after the first, and in the last."""
    means = (kept[:, 1:].double() / num_patches).mean(dim=0).tolist()
    ratios = {f"keep_ratio_s{i}": value for i, value in enumerate(means, start=1)}
    return {**ratios, "keep_ratio": means[-1]}


@torch.inference_mode()
def images_per_second(runner: Runner, images: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median throughput of ``runner`` over ``images`` in batches of ``batch_size``, after a warm-up pass."""
    def one_pass() -> None:
        for start in range(0, len(images), batch_size):
            runner(images[start:start + batch_size])

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def speed_images(split: ImageSplit, backbone_config: Mapping[str, Any]) -> torch.Tensor:
    """``SPEED_BATCH`` normalised images of the split, repeated when it has fewer."""
    count = min(len(split), SPEED_BATCH)
    images = normalize(split.images[:count], backbone_config)
    return images.repeat(math.ceil(SPEED_BATCH / count), 1, 1, 1)[:SPEED_BATCH]


def evaluate_methods(staged: StagedViT, backbone_config: Mapping[str, Any], split: ImageSplit,
                     methods: Sequence[Method], *, batch_size: int = 256, seed: int = 0,
                     speed_repeats: int | None = 5, progress: bool = True,
                     reduction: str = "merge") -> pd.DataFrame:
    """The results table: one row per method, the columns of the module docstring.

    ``speed_repeats=None`` skips the timings (their columns stay empty). ``reduction``: what every pruned
    row does with the tokens it removes (``envs.token_merge``).
    """
    staged = staged.eval()
    batches = math.ceil(len(split) / batch_size)
    bar = tqdm(total=batches * (len(methods) + 1), desc="evaluating", unit="batch", disable=not progress)
    bar.set_postfix_str("unpruned reference")
    reference, reference_kept = predict(make_runner(Method(BASELINE, "baseline"), staged), split,
                                        backbone_config, batch_size, bar)
    rows = []
    for method in methods:
        bar.set_postfix_str(_label(method))
        if method.selector == "baseline":
            predictions, kept = reference, reference_kept
            bar.update(batches)
        else:
            predictions, kept = predict(make_runner(method, staged, seed, reduction), split, backbone_config,
                                        batch_size, bar)
        rows.append({"method": method.name, "budget": method.budget,
                     **quality(predictions, split.labels, reference),
                     **method_gflops(method, staged, kept, reduction),
                     **keep_ratios(kept, staged.num_patches)})
    bar.close()
    table = pd.DataFrame(rows)
    table["budget"] = table["budget"].astype(float)
    for column in TIMING_COLUMNS:
        table[column] = np.nan
    if speed_repeats is not None:
        time_methods(table, staged, methods, speed_images(split, backbone_config), speed_repeats, seed,
                     progress, reduction)
    return table


def _label(method: Method) -> str:
    return method.name if method.budget is None else f"{method.name} @ {method.budget:g}"


def time_methods(table: pd.DataFrame, staged: StagedViT, methods: Sequence[Method], images: torch.Tensor,
                 repeats: int, seed: int, progress: bool = True, reduction: str = "merge") -> None:
    """Fill the timing columns of ``table`` (rows in the order of ``methods``), all in this process."""
    bar = tqdm(methods, desc="timing", unit="method", disable=not progress)
    for row, method in enumerate(bar):
        bar.set_postfix_str(_label(method))
        runner = make_runner(method, staged, seed, reduction)
        table.loc[row, "images_per_s_b1"] = images_per_second(runner, images[:SPEED_SINGLE_IMAGES], 1, repeats)
        table.loc[row, "images_per_s_b256"] = images_per_second(runner, images, SPEED_BATCH, repeats)
    baseline = table.loc[table["method"] == BASELINE, "images_per_s_b256"]
    if len(baseline):
        table["speedup"] = table["images_per_s_b256"] / baseline.iloc[0]


# -- output ------------------------------------------------------------------------------------------------


def _format(column: str, value: Any) -> str:
    """A cell of the Markdown table: blank for missing values, sensible precision per column."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if column.startswith("gflops"):
        return f"{value:.4g}"
    if column == "budget":
        return f"{value:g}"
    if column.startswith("keep_ratio"):
        return f"{value:.3f}"
    if column.startswith("images_per_s"):
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown (no ``tabulate`` needed)."""
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" if column == "method" else "---:" for column in table.columns) + "|"]
    for record in table.to_dict("records"):
        lines.append("| " + " | ".join(_format(column, record[column]) for column in table.columns) + " |")
    return "\n".join(lines)


def column_docs(table: pd.DataFrame) -> dict[str, str]:
    """The definition of every column of ``table``."""
    def doc(column: str) -> str:
        if column in COLUMN_DOCS:
            return COLUMN_DOCS[column]
        return COLUMN_DOCS["keep_ratio_s{i}"].format(i=column.removeprefix("keep_ratio_s"))
    return {column: doc(column) for column in table.columns}


def plot_accuracy_vs_gflops(table: pd.DataFrame, path: Path) -> None:
    """Accuracy against GFLOPs, one line per method across budgets (Agg-safe: no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for name, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("gflops")
        axes.plot(rows["gflops"], rows["accuracy"], marker="*" if name == BASELINE else "o",
                  markersize=12 if name == BASELINE else 5, linestyle="-" if len(rows) > 1 else "none",
                  label=name)
    axes.set_xlabel("GFLOPs per image (backbone + features + policies)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def write_results(table: pd.DataFrame, output_dir: Path, settings: Mapping[str, Any]) -> list[Path]:
    """results.csv, results.json, results.md and, with more than one budget, accuracy_vs_gflops.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    docs = column_docs(table)
    records = table.astype(object).where(table.notna(), None).to_dict("records")
    paths = [output_dir / name for name in ("results.csv", "results.json", "results.md")]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(json.dumps({"settings": settings, "columns": docs, "rows": records}, indent=2) + "\n")
    legend = "\n".join(f"- `{column}`: {doc}" for column, doc in docs.items())
    setting_lines = "\n".join(f"- {key}: `{value}`" for key, value in settings.items())
    paths[2].write_text(f"# Token pruning results\n\n{markdown_table(table)}\n\n## Columns\n\n{legend}\n\n"
                        f"## Settings\n\n{setting_lines}\n")
    if table["budget"].nunique() > 1:
        paths.append(output_dir / "accuracy_vs_gflops.png")
        plot_accuracy_vs_gflops(table, paths[-1])
    return paths


# -- command line ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="RLlib checkpoint directory written by train.py (default: "
                             "reference/marl_policy in the repo)")
    parser.add_argument("--backbone", default=None,
                        help="backbone checkpoint directory (default: the policy checkpoint's, else "
                             f"{REFERENCE_BACKBONE.relative_to(REPO)})")
    parser.add_argument("--data-dir", default=default_data_dir(), help="default: %(default)s")
    parser.add_argument("--dataset", default=None, help="default: the checkpoint's, else cifar10")
    parser.add_argument("--split", default="test", choices=SPLITS, help="default: %(default)s")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N images")
    parser.add_argument("--budgets", default="0.3,0.5,0.7",
                        help="target ratios of the heuristics, comma-separated (default: %(default)s)")
    parser.add_argument("--reduction", default=None, choices=REDUCTIONS,
                        help="what pruned rows do with removed tokens (default: the checkpoint's)")
    parser.add_argument("--checkpoints-per-budget", default="", metavar="RATIO=PATH,...",
                        help="more policy checkpoints, each evaluated at its budget: 0.3=PATH,0.7=PATH")
    parser.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--speed-repeats", type=int, default=5, help="timed passes (default: %(default)s)")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing columns")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Random baseline (default: 0)")
    parser.add_argument("--output-dir", default="results", help="default: %(default)s")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results.csv")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def parse_ratio(text: str, what: str) -> float:
    """A target ratio in (0, 1), or a clear error naming the option."""
    try:
        ratio = float(text)
    except ValueError:
        raise EvaluationError(f"{what}: {text!r} is not a number") from None
    if not 0.0 < ratio < 1.0:
        raise EvaluationError(f"{what}: target ratios must be in (0, 1), got {text}")
    return round(ratio, 6)


def parse_budgets(text: str) -> list[float]:
    """``0.3,0.5,0.7`` -> sorted distinct ratios."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise EvaluationError("--budgets: give at least one target ratio, e.g. 0.3,0.5,0.7")
    return sorted({parse_ratio(part, "--budgets") for part in parts})


def parse_checkpoints_per_budget(text: str) -> dict[float, Path]:
    """``0.3=PATH,0.7=PATH`` -> ``{0.3: PATH, 0.7: PATH}``."""
    out: dict[float, Path] = {}
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        ratio, sep, path = part.partition("=")
        if not sep or not path.strip():
            raise EvaluationError(f"--checkpoints-per-budget: expected RATIO=PATH, got {part!r}")
        budget = parse_ratio(ratio.strip(), "--checkpoints-per-budget")
        if budget in out:
            raise EvaluationError(f"--checkpoints-per-budget: budget {budget:g} given twice")
        out[budget] = Path(path.strip())
    return out


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("limit", "batch_size", "speed_repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def load_all_policies(args: argparse.Namespace) -> tuple[dict[float, tuple[dict, dict, Path]], dict]:
    """Every checkpoint to evaluate, by budget: ``(modules, pruning_config, path)``; and the main config.

    Extra checkpoints must share the main one's pruning points and, unless ``--backbone`` overrides it,
    its backbone, or the rows would not be comparable.
    """
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.exists():
        raise EvaluationError(f"no policy checkpoint at {DEFAULT_CHECKPOINT} (the default; train one with "
                              "train.py and pass --checkpoint PATH)")
    main_path = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    modules, config = load_policies(main_path)
    budget = round(float(config["server"]["target_ratio"]), 6)
    policies = {budget: (modules, config, main_path)}
    main_backbone = resolve_backbone(config, None)
    for extra_budget, path in parse_checkpoints_per_budget(args.checkpoints_per_budget).items():
        if extra_budget in policies:
            raise EvaluationError(f"--checkpoints-per-budget: budget {extra_budget:g} is the main "
                                  f"checkpoint's own target_ratio")
        extra_modules, extra_config = load_policies(path)
        if list(extra_config["server"]["prune_points"]) != list(config["server"]["prune_points"]):
            raise EvaluationError(f"checkpoint {path} prunes at {extra_config['server']['prune_points']}, "
                                  f"the main one at {config['server']['prune_points']}")
        if not args.reduction and extra_config["server"]["reduction"] != config["server"]["reduction"]:
            raise EvaluationError(f"checkpoint {path} was trained to {extra_config['server']['reduction']} "
                                  f"tokens, the main one to {config['server']['reduction']} (pass --reduction "
                                  "to force one)")
        extra_backbone = resolve_backbone(extra_config, None)
        if not args.backbone and extra_backbone != main_backbone:
            raise EvaluationError(f"checkpoint {path} was trained on backbone {extra_backbone}, the main one "
                                  f"on {main_backbone} (pass --backbone to force one)")
        trained = round(float(extra_config["server"]["target_ratio"]), 6)
        if trained != extra_budget:
            print(f"note: checkpoint {path} was trained at target_ratio {trained:g}; evaluating it at "
                  f"{extra_budget:g}", file=sys.stderr)
        policies[extra_budget] = (extra_modules, extra_config, path)
    return policies, config


def run(args: argparse.Namespace) -> int:
    """Check everything that can fail cheaply, then evaluate, print and write; nothing written on error."""
    _check_positive(args)
    budgets = parse_budgets(args.budgets)
    policies, config = load_all_policies(args)
    output_dir = Path(args.output_dir)
    if (output_dir / "results.csv").exists() and not args.overwrite:
        raise EvaluationError(f"{output_dir / 'results.csv'} exists; pass --overwrite to replace it")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone_path = resolve_backbone(config, args.backbone)
    vit, backbone_config = load_backbone(backbone_path)
    main_path = next(iter(policies.values()))[2]
    staged = make_staged(vit, config["server"]["prune_points"], f"checkpoint {main_path}, backbone {backbone_path}")
    for modules, _, path in policies.values():
        check_policies(modules, staged.num_patches, path)
    server = config["server"]
    dataset = args.dataset or server.get("dataset", "cifar10")
    split = load_split(dataset, args.split, args.data_dir, input_size=backbone_config["input_size"],
                       val_size=server.get("val_size", DEFAULT_VAL_SIZE),
                       seed=server.get("split_seed", DEFAULT_SPLIT_SEED), limit=args.limit)
    methods = plan_methods(budgets, {b: (m, checkpoint_agents(c)) for b, (m, c, _) in policies.items()})
    reduction = args.reduction or server["reduction"]
    table = evaluate_methods(staged, backbone_config, split, methods, batch_size=args.batch_size,
                             seed=args.seed, speed_repeats=None if args.no_speed else args.speed_repeats,
                             reduction=reduction)
    settings = {"checkpoints": {f"{b:g}": str(path) for b, (_, _, path) in policies.items()},
                "iteration": config.get("iteration"), "backbone": str(backbone_path),
                "dataset": dataset, "split": args.split,
                "images": len(split), "limit": args.limit, "prune_points": list(staged.prune_points),
                "reduction": reduction,
                "budgets": sorted(set(budgets) | set(policies)), "seed": args.seed,
                "batch_size": args.batch_size, "speed_repeats": None if args.no_speed else args.speed_repeats,
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(markdown_table(table))
    paths = write_results(table, output_dir, settings)
    print("\nwrote " + ", ".join(str(path) for path in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 2 with one ``error: ...`` line on stderr otherwise."""
    try:
        return run(build_parser().parse_args(argv))
    except (UsageError, EvaluationError, PolicyCheckpointError, CheckpointError, DataError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
