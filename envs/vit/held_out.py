"""Which images a backbone can be scored on honestly: the held-out checks every command runs on a split.

A backbone checkpoint records the validation split held out beside it (``backbone.py``: its seed, size, the
count of training images it was drawn from and a colour fingerprint of its first images). A ``val`` split
scored with that backbone must be that split or a part of it, drawn from a copy of the data set that gives the
same images; any split must have the backbone's classes. :func:`load_checked_split` reads a split through
:func:`envs.vit.data.load_split` with all of these checks, before anything is decoded where they need no data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from envs.vit.data import (
    DataError,
    ImageSplit,
    check_classes,
    held_out_fingerprint,
    load_split,
    training_split_size,
)

FINGERPRINT_TOLERANCE = 3.0  # mean difference of the fingerprints' colours, of 255, above which the images are others


def same_images(found: Sequence[Sequence[float]], recorded: Sequence[Sequence[float]]) -> bool:
    """Whether two :func:`held_out_fingerprint` s name the same images: read again, or re-encoded (within
    :data:`FINGERPRINT_TOLERANCE`)."""
    return fingerprint_difference(found, recorded) <= FINGERPRINT_TOLERANCE


def val_drawn_from(backbone_config: Mapping[str, Any]) -> int | None:
    """The count of training images a backbone's validation split was drawn from (:func:`training_split_size`):
    as recorded, or, in a config that records none, the recorded split sizes added up where the backbone trained
    on the whole split (no ``--limit``); None where unknown."""
    if "val_drawn_from" in backbone_config:
        return backbone_config["val_drawn_from"]
    sizes = backbone_config.get("split_sizes", {})
    if backbone_config.get("recipe", {}).get("limit") is None and {"train", "val"} <= set(sizes):
        return sizes["train"] + sizes["val"]
    return None


def fingerprint_difference(found: Sequence[Sequence[float]], recorded: Sequence[Sequence[float]]) -> float:
    """How far apart two :func:`held_out_fingerprint` s are: the mean difference of their colours, of 255 (the
    same images read again differ by at most :data:`FINGERPRINT_TOLERANCE`, re-encoded ones included)."""
    return float(np.abs(np.asarray(found) - np.asarray(recorded)).mean())


def held_out_split(backbone_config: Mapping[str, Any], dataset: str,
                   class_names: Sequence[str] | None = None) -> dict[str, int]:
    """The validation split a backbone held out of its data set as ``{"val_size", "split_seed"}``, where its config
    records it (``backbone.py`` does), for ``dataset`` if it is that data set: by name, or, where the data's
    ``class_names`` are known, by the classes (an ImageFolder copy of CIFAR-10 read as ``folder``); else ``{}``.
    Only that split, or a part of it, is clear of the images the backbone trained on (:func:`check_fits_backbone`)."""
    same_classes = class_names is not None and tuple(backbone_config.get("class_names") or ()) == tuple(class_names)
    if (backbone_config.get("dataset") != dataset and not same_classes) or "split_seed" not in backbone_config:
        return {}
    return {"val_size": backbone_config["split_sizes"]["val"], "split_seed": backbone_config["split_seed"]}


def check_held_out(split_name: str, dataset: str, val_size: int, seed: int, backbone_config: Mapping[str, Any],
                   class_names: Sequence[str] | None = None) -> tuple[int, int] | None:
    """Raise a DataError where a ``val`` split of ``val_size`` images drawn with ``seed`` would hold images the
    backbone trained on: it must be the validation split the backbone recorded or a part of it. Needs no data,
    so the commands check it before decoding any, by the data set's name; :func:`check_fits_backbone` checks it
    again knowing the classes (:func:`held_out_split`). Returns the recorded split's size and seed, for a ``val``
    split of a backbone that records one (else None)."""
    recorded_split = held_out_split(backbone_config, dataset, class_names)
    if split_name != "val" or not recorded_split:
        return None
    held_out, held_out_seed = recorded_split["val_size"], recorded_split["split_seed"]
    if seed != held_out_seed or val_size > held_out:
        raise DataError(f"a validation split of {val_size} images drawn with seed {seed} would hold images the "
                        f"backbone trained on: it held out {held_out} images drawn with seed {held_out_seed}, and a "
                        f"validation split must be those or a part of them (seed {held_out_seed}, at most {held_out} "
                        f"images)")
    return held_out, held_out_seed


CLASS_COUNTS = {"cifar10": 10, "cifar100": 100}
"""The classes of the data sets known by name, which a backbone of another count cannot score."""


def check_class_count(dataset: str, backbone_config: Mapping[str, Any]) -> None:
    """A DataError where ``dataset``, one known by name, has another count of classes than the backbone of
    ``backbone_config``: checked before the data is read (or downloaded, 170 MB for CIFAR-100)."""
    count = CLASS_COUNTS.get(dataset)
    if count is not None and count != backbone_config["num_classes"]:
        trained_on = backbone_config.get("dataset")
        raise DataError(f"{dataset} has {count} classes, the backbone {backbone_config['num_classes']}"
                        + (f" (it was trained on {trained_on}: pass --dataset {trained_on}, or a backbone trained on "
                           f"{dataset})" if trained_on else ""))


def check_fits_backbone(split: ImageSplit, split_name: str, dataset: str, val_size: int, seed: int,
                        backbone_config: Mapping[str, Any], data_dir: str | os.PathLike | None = None,
                        download: bool = False) -> None:
    """Raise a DataError where the backbone of ``backbone_config`` cannot score ``split`` honestly: classes other
    than those it was trained on (its answers would be compared with other labels), or, for ``val``, images it
    trained on. A backbone checkpoint records the validation split held out beside it (``backbone.py``); a
    validation split of its data set must be that one or a part of it (the same seed, at most its size), drawn
    from a copy of the data set (at ``data_dir``) of as many training images (:func:`training_split_size`) that
    gives the same images (:func:`held_out_fingerprint`). :func:`load_checked_split` has :func:`load_split`
    check the classes before decoding, and this checks them again for a split read any other way."""
    check_classes(split.class_names, backbone_config)
    recorded_split = check_held_out(split_name, dataset, val_size, seed, backbone_config, split.class_names)
    if recorded_split is None:
        return
    held_out, held_out_seed = recorded_split
    recorded = backbone_config.get("val_fingerprint")
    if recorded is None:  # a backbone config that records no fingerprint: nothing to compare
        return
    drawn_from = val_drawn_from(backbone_config)
    found_images = None if drawn_from is None else training_split_size(dataset, data_dir, download)
    if found_images != drawn_from:
        raise DataError(f"this copy of {dataset} holds {found_images} training images, the copy the backbone was "
                        f"trained on {drawn_from}: from another count the same seed draws another validation split, "
                        f"which would hold images the backbone trained on: point --data-dir at that copy, or train a "
                        f"backbone on this one with backbone.py")
    found = held_out_fingerprint(dataset, data_dir, backbone_config["input_size"], held_out, held_out_seed, download)
    if not same_images(found, recorded):
        raise DataError(f"this copy of {dataset} holds other images, or orders them otherwise, than the copy the "
                        f"backbone was trained on (its validation images differ in colour by "
                        f"{fingerprint_difference(found, recorded):.1f} of 255 "
                        f"on average), so its validation split would hold images the backbone trained on: point "
                        f"--data-dir at that copy, or train a backbone on this one with backbone.py")


def load_checked_split(dataset: str, split: str, data_dir: str | os.PathLike | None, backbone_config: Mapping[str, Any],
                       *, val_size: int, seed: int, limit: int | None = None, download: bool = False,
                       memory_budget_mb: float | None = None) -> ImageSplit:
    """:func:`load_split` at the backbone's input size, of images the backbone of ``backbone_config`` can score
    honestly: checked before anything is read or downloaded (:func:`check_held_out`, :func:`check_class_count`)
    and after (:func:`check_fits_backbone`)."""
    check_held_out(split, dataset, val_size, seed, backbone_config)
    check_class_count(dataset, backbone_config)
    images = load_split(dataset, split, data_dir, input_size=backbone_config["input_size"], val_size=val_size,
                        seed=seed, limit=limit, download=download, memory_budget_mb=memory_budget_mb,
                        backbone_config=backbone_config)
    check_fits_backbone(images, split, dataset, val_size, seed, backbone_config, data_dir, download)
    return images
