"""``--init-from``: a new run, with a fresh warm-up and schedule, from the weights of a backbone this command
exported (a second cycle), read before the data is decoded so that a bad one is refused at once
(:func:`read_init_from`), and loaded once the run's data is known to be what that backbone did not train on
(:func:`init_from_export`)."""

from __future__ import annotations

import torch

from envs.errors import UsageError
from envs.vit.backbone_checkpoint import CheckpointError, load_backbone, repository_relative
from envs.vit.held_out import same_images, val_drawn_from


def read_init_from(directory: str) -> tuple[torch.nn.Module, dict]:
    """The exported backbone ``--init-from`` names, read before the data is decoded so that a bad one is refused
    at once."""
    try:
        return load_backbone(directory)
    except CheckpointError as error:
        raise UsageError(f"--init-from {directory}: {error}") from None


def init_from_export(model: torch.nn.Module, directory: str, init_export: tuple[torch.nn.Module, dict],
                     config: dict) -> dict:
    """Load the weights of ``init_export``, the exported backbone in ``directory`` (:func:`read_init_from`), into
    ``model`` and return what the model card says of it. The weights are the export's (float16 unless it was
    exported with --full-precision). Refused unless it is the same model on the same classes, input and
    validation split: a backbone that trained on other splits has seen this run's validation images."""
    export_model, export_config = init_export
    for key in ("model_name", "model_kwargs", "class_names", "input_size", "mean", "std"):
        if export_config.get(key) != config[key]:
            raise UsageError(f"--init-from {directory}: its {key} is {export_config.get(key)!r}, this run's is "
                             f"{config[key]!r}")
    held_out, recorded = export_config.get("split_sizes", {}).get("val"), export_config.get("val_fingerprint")
    drawn_from = val_drawn_from(export_config)
    if held_out != config["split_sizes"]["val"] or recorded is None:
        why = ("it records none" if recorded is None else f"it recorded a validation split of {held_out} images, "
               f"this run's has {config['split_sizes']['val']} (--val-size, --limit)")
    elif drawn_from not in (None, config["val_drawn_from"]):
        why = f"it drew it from {drawn_from} training images, this run from {config['val_drawn_from']}"
    elif not same_images(recorded, config["val_fingerprint"]):
        why = "it held out other images: another --split-seed or another copy of the data set"
    else:
        why = None
    if why is not None:
        raise UsageError(f"--init-from {directory}: its val_fingerprint is not this run's ({why}), so it may have "
                         f"trained on this run's validation images")
    model.load_state_dict(export_model.state_dict())
    return {"path": repository_relative(directory), "epochs": export_config.get("recipe", {}).get("epochs"),
            "test_accuracy": export_config.get("test_accuracy")}
