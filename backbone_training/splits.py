"""The splits a run reads: the training and validation splits before it trains (:func:`training_data`), the config
that records them, for the commands that hold out the same images (:func:`data_config`), the batch fitted to the
training split (:func:`fitted_batch_size`), and the test split, read once the run has finished
(:func:`read_test_accuracy`). Apart from backbone.py: which images a run may see, and that the test split is read
only at the end, are one idea."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

import torch

from backbone_training.model_geometry import ModelGeometry
from backbone_training.training_step import accuracy
from cli import data_access
from envs.vit.data import (
    DataError,
    ImageSplit,
    StreamedImages,
    class_difference,
    held_out_fingerprint,
    load_split,
    split_class_names,
    training_split_size,
)


def training_data(args: argparse.Namespace, input_size: int,
                  device: torch.device) -> tuple[ImageSplit, ImageSplit]:
    """The training and validation splits ``args`` names, at ``input_size``, the validation images decoded on
    ``device`` (they are read every epoch), and one line on stdout of what the data turned out to be. A
    ``DataError`` where the test split has other classes: labels are class indices, so they would name other
    classes, and the test split is read only after training."""
    split_kw = dict(data_dir=args.data_dir, input_size=input_size, val_size=args.val_size,
                    seed=args.split_seed, limit=args.limit, **data_access(args))
    train_split = load_split(args.dataset, "train", **split_kw)
    test_classes = split_class_names(args.dataset, "test", args.data_dir, args.download)
    if test_classes != train_split.class_names:
        difference = class_difference(test_classes, train_split.class_names, "the test split", "the training split")
        raise DataError(f"{difference}: the training and test splits must hold the same classes")
    # With --limit, validation reads the first --limit images of the held-out order, not a subset drawn from all
    # of it: that is the split the config records (split_sizes.val), which train.py and evaluate.py hold out.
    val_split = load_split(args.dataset, "val", **{**split_kw, "val_size": min(args.limit or args.val_size,
                                                                               args.val_size), "limit": None})
    if not isinstance(val_split.images, StreamedImages):
        val_split = dataclasses.replace(val_split, images=val_split.images.to(device))
    num_classes = len(train_split.class_names)
    counts = torch.bincount(train_split.labels, minlength=num_classes).tolist()
    unseen = [name for name, count in zip(train_split.class_names, counts, strict=True) if count == 0]
    if unseen and not args.limit:  # the validation split is drawn across classes: it may take a rare one whole
        its, it = ("their", "them") if len(unseen) > 1 else ("its", "it")
        warnings.warn(f"no training image of class{'es' if len(unseen) > 1 else ''} "
                      f"{', '.join(map(repr, unseen[:5]))}{' and more' if len(unseen) > 5 else ''}: all {its} images "
                      f"are in the validation split, so the backbone will not learn {it} (a smaller --val-size keeps "
                      f"some)", stacklevel=2)
    shown = ", ".join(train_split.class_names[:10]) + (", ..." if num_classes > 10 else "")
    print(f"data: {args.dataset} in {args.data_dir}: {num_classes} classes ({shown}); {len(train_split)} training "
          f"and {len(val_split)} validation images")
    return train_split, val_split


def data_config(args: argparse.Namespace, geometry: ModelGeometry, train_split: ImageSplit,
                val_split: ImageSplit) -> dict:
    """The export's config as far as it is known before training: the model, its input, its classes, and the
    splits, with what names the held-out one (its seed, the count of training images it was drawn from and the
    fingerprint of its images) for the commands that score the backbone on it."""
    return {"model_name": args.model, "model_kwargs": geometry.kwargs, "num_classes": len(train_split.class_names),
            "class_names": list(train_split.class_names), "input_size": geometry.input_size,
            "mean": list(geometry.mean), "std": list(geometry.std), "dataset": args.dataset,
            "split_sizes": {"train": len(train_split), "val": len(val_split)},
            "split_seed": args.split_seed,
            "val_fingerprint": held_out_fingerprint(args.dataset, args.data_dir, geometry.input_size, len(val_split),
                                                    args.split_seed, args.download),
            "val_drawn_from": training_split_size(args.dataset, args.data_dir, args.download)}


def fitted_batch_size(args: argparse.Namespace, train_size: int) -> int:
    """The images of a step: ``--batch-size``, or all ``train_size`` training images where they are fewer,
    less one where mixup needs an even count; a note on stderr where it is not the ``--batch-size`` asked for.
    The caller records it in ``args``: the learning rate is scaled for the batch that trains, and the recipe
    records it."""
    batch_size = min(args.batch_size, train_size)  # a split smaller than a batch trains in one
    if args.mixup > 0 or args.cutmix > 0:
        batch_size -= batch_size % 2  # timm's mixup pairs each image with another of its batch
    if batch_size == 0:
        raise DataError(f"{train_size} training image: mixup and cutmix need at least two")
    if batch_size != args.batch_size:
        print(f"note: --batch-size {args.batch_size} is more than the {train_size} training images: steps of "
              f"{batch_size} images, the learning rate scaled for them", file=sys.stderr)
    return batch_size


def read_test_accuracy(args: argparse.Namespace, model: torch.nn.Module, config: dict,
                       device: torch.device) -> tuple[float, int]:
    """The trained model's top-1 accuracy on the test split, in float32, and the count of test images: read once
    a run has finished, for the model card."""
    test_split = load_split(args.dataset, "test", data_dir=args.data_dir, input_size=config["input_size"],
                            limit=args.limit, **data_access(args))
    return accuracy(model, test_split, config, device, amp=False), len(test_split)
