"""train_state.pt, what ``--resume`` goes on from: what it holds (:func:`training_snapshot`), written whole or
not at all and read back (:func:`save_state`, :func:`read_state`), restored into the model, the optimiser and every
random stream (:func:`restore_state`), and the check that a resumed run reads the data the run trained on
(:func:`check_same_data`). Apart from backbone.py, which decides when a state is saved; the settings of a resumed
run, its command line checked against the recipe it recorded, are backbone.py's (``resumed_args``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone_training.training_step import TrainingStep
from envs.atomic_file import replaced_atomically
from envs.errors import UsageError
from envs.vit.data import DataError
from envs.vit.held_out import same_images

STATE_FILE = "train_state.pt"
RESUMED_DATA = ("class_names", "split_sizes", "val_drawn_from", "val_fingerprint")  # a resumed run's data repeats


def training_snapshot(args: argparse.Namespace, model: torch.nn.Module, step: TrainingStep, device: torch.device,
                      history: list[dict], epoch: int, test_readings: list[dict], config: dict) -> dict:
    """What train_state.pt holds after ``epoch`` (counted from 0): the weights, the optimiser, every random
    stream, the history, the settings and the data the run trained on, all that ``--resume`` needs to go on as
    if it had not stopped."""
    return {"model": model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "generator": step.generator.get_state(), "generator_device": device.type,
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "history": history, "epoch": epoch + 1, "args": vars(args), "test_readings": test_readings,
            "data": {key: config[key] for key in RESUMED_DATA}}


def save_state(path: Path, state: dict) -> None:
    """Write the resumable training state (``--resume`` reads it) in one step: a crash while saving leaves the
    previous state whole."""
    with replaced_atomically(path) as staging:
        torch.save(state, staging)


def read_state(path: Path) -> dict:
    """The training state ``--resume`` goes on from; a damaged file is one error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load's errors on a damaged file: RuntimeError, EOFError, UnpicklingError, ...
        raise UsageError(f"cannot read {path} ({type(error).__name__}: {error}): the run cannot be resumed; start "
                         f"it again with --overwrite, or a new run with --init-from its export") from None


def restore_state(state: dict, model: torch.nn.Module, step: TrainingStep, reseed: int,
                  device: torch.device) -> None:
    """Continue where ``state`` (train_state.pt) stopped: the weights, the optimiser and every random stream, so
    that a resumed run draws what an uninterrupted one would (:func:`restore_generator` says where it cannot)."""
    model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    restore_generator(step.generator, state, reseed=reseed)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":  # stochastic depth draws from it on a GPU
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if "numpy_rng" in state:  # mixup's generator, where the state has it
        np.random.set_state(state["numpy_rng"])


def restore_generator(generator: torch.Generator, state: dict, reseed: int) -> None:
    """Continue the augmentation stream that ``train_state.pt`` saved. A stream saved on another kind of device
    (a state that names none drew on the CPU) cannot continue on this one, so the rest of
    the run draws from a fresh stream seeded with ``reseed`` instead, and says so."""
    saved_on = state.get("generator_device", "cpu")
    if saved_on == generator.device.type:
        generator.set_state(state["generator"])
        return
    generator.manual_seed(reseed)
    print(f"note: the saved augmentation stream was drawn on {saved_on}; on {generator.device.type} the rest of "
          f"the run draws a new one (seed {reseed}), so it will not repeat an uninterrupted run's augmentation")


def check_same_data(recorded: Mapping[str, Any] | None, config: Mapping[str, Any], data_dir: str) -> None:
    """Refuse to resume on other data than the run trained on (a ``--data-dir`` given on resume is meant for a run
    moved to another machine): other classes would relabel what it learned, another validation split would hold
    images it trained on. ``recorded``: the train_state's ``data`` (None where a state lacks it: nothing to check)."""
    if recorded is None:
        return
    changed = [key for key in RESUMED_DATA  # a recorded state may lack val_drawn_from
               if key != "val_fingerprint" and recorded.get(key, config[key]) != config[key]]
    if not same_images(config["val_fingerprint"], recorded["val_fingerprint"]):
        changed.append("validation images")
    if changed:
        raise DataError(f"--resume: the data in {data_dir} is not what the run trained on (its {', '.join(changed)} "
                        f"differ): point --data-dir at a copy of that data set, or start a new run")
