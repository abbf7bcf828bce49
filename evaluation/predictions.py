"""What each row answers on a split, its predicted class and kept tokens per image (:func:`predict`, over the
split's :func:`normalized_batches`), and the columns computed from those answers: quality (:func:`quality`), cost
(:func:`cost`) and every row's answer on every image, written to predictions.csv.gz
(:func:`per_image_predictions`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

from cli import progress_bar
from envs.vit.data import ImageSplit
from envs.vit.scoring import percent_equal
from evaluation.results_table import prediction_column
from policies.cascade import CascadeViT
from policies.pruned_vit import PrunedViT

if TYPE_CHECKING:  # the rows' module calibrates cascades on normalized_batches
    from evaluation.methods import Method


def predict(models: Mapping[Method, PrunedViT | CascadeViT], split: ImageSplit, batch_size: int,
            progress: str | None = None) -> dict[Method, tuple[torch.Tensor, torch.Tensor]]:
    """Each model's predicted classes ``[n]`` and kept tokens ``[n, num_stages]`` over the whole split, on the
    CPU. Every batch of images is read once for all models, so a streamed split is decoded once, and moved to
    the models' device once; the predictions stay there until the end (no wait for the device per batch). With
    ``progress`` (a name), a progress bar of that name over the batches."""
    predictions: dict[Method, list] = {method: [] for method in models}
    kept: dict[Method, list] = {method: [] for method in models}
    first = next(iter(models.values()))  # one backbone: one device, one normalisation
    for inputs in normalized_batches(first, split, batch_size, progress):
        for method, model in models.items():
            logits, batch_kept = model.forward_with_kept(inputs)
            predictions[method].append(logits.argmax(dim=1))
            kept[method].append(batch_kept)  # on the CPU already (PrunedViT.forward_with_kept)
    return {method: (torch.cat(predictions[method]).cpu(), torch.cat(kept[method])) for method in models}


def normalized_batches(model: PrunedViT | CascadeViT, split: ImageSplit, batch_size: int,
                       progress: str | None = None) -> Iterator[torch.Tensor]:
    """``split``'s images normalised for ``model``, on its device, ``batch_size`` at a time. With ``progress`` (a
    name), a progress bar of that name over the batches, shown from the first batch asked for, so that nothing is
    shown where none is read."""
    with progress_bar(total=math.ceil(len(split) / batch_size), name=progress, unit="batch") as bar:
        for images in split.batches(batch_size):
            yield model.normalize(images.to(model.device))
            bar.update()


def quality(predictions: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro F1 and agreement with the unpruned predictions, in percent."""
    y_true, y_pred = labels.numpy(), predictions.numpy()
    return {"accuracy": percent_equal(predictions, labels),
            "f1_macro": 100.0 * float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro",
                                               zero_division=0)),
            "agreement": percent_equal(predictions, reference)}


def cost(model: PrunedViT | CascadeViT, kept: torch.Tensor) -> dict[str, float]:
    """Mean per-image GMACs over each image's own token schedule and, but for a cascade (whose pruning points
    are its own), the mean fraction kept per stage."""
    parts = model.mean_gflops(kept)
    gflops = {"gflops": parts.total, "gflops_backbone": parts.backbone, "gflops_features": parts.features,
              "gflops_policies": parts.policies}
    if isinstance(model, CascadeViT):
        return gflops
    ratios = (kept[:, 1:].double() / model.staged.num_patches).mean(dim=0).tolist()
    return {**gflops, **{f"keep_ratio_s{i}": r for i, r in enumerate(ratios, start=1)}, "keep_ratio": ratios[-1]}


def per_image_predictions(methods: Sequence[Method], outputs: Mapping[Method, tuple],
                          split: ImageSplit) -> pd.DataFrame:
    """Each image's label and every row's predicted class, ``[n, 1 + len(methods)]``, in the split's order,
    indexed by ``image``, the image's index in its data set's file (``ImageSplit.file_indices``; its position in
    the split where it has none): what the rows' accuracy, F1, agreement and paired intervals are computed from,
    so that they can be checked, or rows of runs on other subsets of one split compared on the images they
    share, without running the models again."""
    columns = {prediction_column(method.name, method.budget): outputs[method][0].numpy() for method in methods}
    index = pd.Index(np.arange(len(split)) if split.file_indices is None else split.file_indices, name="image")
    return pd.DataFrame({"label": split.labels.numpy(), **columns}, index=index)
