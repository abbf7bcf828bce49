"""A trained policy as safetensors plus JSON: what inference loads, so that loading never unpickles.

RLlib checkpoints are pickles, and unpickling a checkpoint someone sent you runs their code. Every training
checkpoint therefore carries, beside RLlib's files, an export of its policy modules
(:func:`stage_checkpoint` writes it before the checkpoint is reported to Tune)::

    <checkpoint>/export/policies.safetensors   every module's state dict, keys prefixed by policy id
                                               ("attention._token_net.0.weight", "similarity. ...")
    <checkpoint>/export/policy.json            what pruning_config.json holds (``CheckpointInfo``),
                                               and per module what rebuilds it: {"modules": {policy:
                                               {"num_patches", "num_features", "hidden"}}}

``policies.checkpoints.load_exported_policies`` rebuilds each policy's networks from these two files only (JSON and
safetensors, neither of which can run code) as ``policies.token_scorer.TokenScorer``: plain torch, so that
inference needs no Ray. Re-export a checkpoint (the committed reference policy, an older run) with::

    python -m policies.export reference/marl_policy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import OneLineParser, run_command
from envs.vit.backbone_checkpoint import write_weights_and_config
from policies.checkpoints import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    MODULES_DIR,
    PRUNING_CONFIG,
    CheckpointInfo,
    PolicyCheckpointError,
    checkpoint_directory,
    export_path,
    has_export,
    is_export,
    load_rllib_policies,
)
from policies.token_scorer import TokenScoring

if TYPE_CHECKING:  # the export is read and written without Ray; staging a checkpoint is training's
    from ray.rllib.algorithms.algorithm import Algorithm


def module_config(module: TokenScoring) -> dict[str, Any]:
    """What rebuilds ``module`` without RLlib's pickles: what it observes and its width."""
    num_patches, num_features = module.token_shape
    return {"num_patches": int(num_patches), "num_features": int(num_features), "hidden": int(module.hidden)}


def write_export(modules: Mapping[str, TokenScoring], info: CheckpointInfo,
                 checkpoint: str | os.PathLike) -> Path:
    """Write ``modules`` and ``info`` as ``<checkpoint>/export``; each file is replaced atomically."""
    directory = export_path(checkpoint)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"{name}.{key}": value.detach().to("cpu").contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    config = {**info.to_json(), "modules": {name: module_config(module) for name, module in modules.items()}}
    write_weights_and_config(directory, EXPORT_WEIGHTS, weights, EXPORT_CONFIG, config)
    return directory


def export_policies(checkpoint_dir: str | os.PathLike) -> Path:
    """Export the policy of an RLlib training checkpoint (read through RLlib, i.e. unpickled: only for
    checkpoints you trained yourself) beside it (``checkpoint_dir`` or its ``export`` folder); returns the export
    directory. A checkpoint that holds its export but not RLlib's modules (as shared, or
    ``reference/marl_policy`` without its ``learner_group``) is a :class:`PolicyCheckpointError` saying it is
    exported already: there is nothing to export it from; so is an export folder shared alone, under any name."""
    path = checkpoint_directory(checkpoint_dir)
    if is_export(path) and not (path / PRUNING_CONFIG).is_file():  # else "not a policy checkpoint", which it is
        raise PolicyCheckpointError(f"{path} is a policy export ({EXPORT_CONFIG}), not a checkpoint with RLlib's "
                                    f"modules to export from: it is exported already, and loading it reads it")
    if has_export(path) and not (path / MODULES_DIR).is_dir():
        raise PolicyCheckpointError(f"checkpoint {path} holds its export ({export_path(path)}) but not RLlib's "
                                    f"modules ({MODULES_DIR}/) to export from: it is exported already, and loading it "
                                    "reads the export")
    modules, info = load_rllib_policies(path)
    return write_export(modules, info, path)


def stage_checkpoint(algo: Algorithm, directory: str | os.PathLike, info: CheckpointInfo) -> Path:
    """Save ``algo``, ``pruning_config.json`` and the policy export into ``directory``
    (empty or absent): a complete checkpoint, ready to be reported to Tune."""
    path = Path(directory).resolve()  # RLlib saves to URIs: a relative path is not one
    algo.save_to_path(str(path))
    (path / PRUNING_CONFIG).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    export_policies(path)
    return path


EXPORT_DESCRIPTION = """\
Write the export (safetensors + JSON, policies/export.py) of each training checkpoint into its directory, so that
loading it (evaluate.py, PrunedViT) opens no pickle. train.py exports every checkpoint it writes: this is for a
checkpoint without one (an older run) or to rewrite one.

    python -m policies.export runs/marl/target_ratio=0.5/checkpoint_000005
    python -m policies.export runs/marl/*/checkpoint_*          # every checkpoint of a run

Exporting reads the checkpoint through RLlib, which unpickles it: export only checkpoints you trained yourself."""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m policies.export CHECKPOINT...``: export each checkpoint in place."""
    parser = OneLineParser(prog="python -m policies.export", formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=EXPORT_DESCRIPTION)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="a checkpoint directory of train.py (its export/ folder is written inside it)")

    def export_each() -> int:
        for checkpoint in parser.parse_args(argv).checkpoints:
            print(f"wrote {export_policies(checkpoint)}")
        return 0

    return run_command(export_each, lambda: "interrupted: the exports printed as written are complete (each file "
                                            "is replaced whole)")


if __name__ == "__main__":
    sys.exit(main())

