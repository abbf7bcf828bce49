"""The model ``--model`` and ``--model-kwargs`` name, as far as the data pipeline needs it before the data is read:
its kwargs (:func:`parse_kwargs`), the side of its square input (:func:`square_input_size`), and the mean and std
that normalise it (:func:`model_geometry`), read from a probe model so that a model train.py and evaluate.py could
not prune is refused before anything is decoded. Apart from backbone.py: benchmarks/backbone_step.py builds its
images at the same size."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any

import torch

from envs.errors import UsageError
from envs.vit.backbone_checkpoint import TIMM_KWARG_ERRORS, CheckpointError, create_vit, timm_error
from envs.vit.staged_vit import check_prunable

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


SET_BY_BACKBONE_PY = {"num_classes": "the data set's classes", "pretrained": "--pretrained"}
"""timm kwargs that backbone.py passes itself, from what: given again, timm's error would say only that
``create_model()`` got multiple values for them."""


def parse_kwargs(pairs: list[str]) -> dict:
    """``["img_size=32", "patch_size=4"]`` -> ``{"img_size": 32, "patch_size": 4}``."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"model kwarg {pair!r} is not key=value")
        if key in SET_BY_BACKBONE_PY:
            raise UsageError(f"model kwarg {key!r} is set from {SET_BY_BACKBONE_PY[key]}: leave it out of "
                             f"--model-kwargs")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """What the data pipeline needs of the model before the data is read: its timm kwargs, the side of its square
    input in pixels, and the mean and std that normalise it."""

    kwargs: dict[str, Any]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_geometry(args: argparse.Namespace) -> ModelGeometry:
    """The geometry of the model ``args`` names, read from a probe model of one class built before the data is
    read: a model that train.py and evaluate.py could not prune is refused then, not after training. The mean
    and std are timm's for the model, or CIFAR's own for a model trained on CIFAR from scratch."""
    kwargs = parse_kwargs(args.model_kwargs)
    try:
        probe = create_vit(args.model, 1, kwargs)
    except CheckpointError as error:
        raise UsageError(f"{model_flags(args)}: {error}") from None
    try:
        check_prunable(probe)
    except UsageError as error:
        raise UsageError(f"{model_flags(args)}: {error}") from None
    input_size = square_input_size(probe, kwargs)
    if kwargs.get("in_chans", 3) != 3:
        raise UsageError(f"in_chans={kwargs['in_chans']!r}: the data pipeline feeds RGB images (a grey image "
                         f"converted), so the model takes 3 channels")
    check_trains(probe, input_size, model_flags(args))
    mean, std = tuple(probe.default_cfg.get("mean", CIFAR_MEAN)), tuple(probe.default_cfg.get("std", CIFAR_STD))
    if not args.pretrained and args.dataset.startswith("cifar"):
        mean, std = CIFAR_MEAN, CIFAR_STD  # from scratch: the data set's own statistics
    return ModelGeometry(kwargs=kwargs, input_size=input_size, mean=mean, std=std)


def model_flags(args: argparse.Namespace) -> str:
    """``--model NAME --model-kwargs K=V ...`` as given, for an error about the model they build."""
    return " ".join(["--model", args.model, *(["--model-kwargs", *args.model_kwargs] if args.model_kwargs else [])])


def check_trains(probe: torch.nn.Module, input_size: int, flags: str) -> None:
    """A ``UsageError`` naming ``flags`` where the ``probe`` model fails a forward pass in training mode on two
    blank images: timm builds some kwargs it cannot train with (``drop_path_rate=1.5`` gives DropPath a keep
    probability of -0.5, which ``bernoulli_`` refuses), and the run would end in a traceback at its first step,
    after the data was decoded. Run at the boundary rather than each kwarg checked by hand: a timm model of
    fixed kwargs and input that fails to run is the kwargs'."""
    probe.train()
    try:
        with torch.no_grad():
            probe(torch.zeros(2, 3, input_size, input_size))
    except TIMM_KWARG_ERRORS as error:
        raise UsageError(f"{flags}: timm's model fails to train with them: {timm_error(error)}") from None


def square_input_size(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """The side in pixels of the images ``model`` (built with ``kwargs``) takes: its ``img_size``, else its timm
    default; a ``UsageError`` unless one number (the data pipeline feeds square images)."""
    input_size = kwargs.get("img_size", model.default_cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise UsageError(f"img_size={input_size!r}: the data pipeline feeds square images, so img_size is one "
                         f"number of pixels")
    return input_size
