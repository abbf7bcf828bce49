"""A trained policy as safetensors plus JSON: what inference loads, so that loading never unpickles.

RLlib checkpoints are pickles, and unpickling a checkpoint someone sent you runs their code. Every training
checkpoint therefore carries, beside RLlib's files, an export of its policy modules
(``policies.checkpoints.stage_checkpoint`` writes it before the checkpoint is reported to Tune)::

    <checkpoint>/export/policies.safetensors   every module's state dict, keys prefixed by policy id
                                               ("attention._token_net.0.weight", "similarity. ...")
    <checkpoint>/export/policy.json            {"problem", "iteration", "val_score"} as in pruning_config.json,
                                               and per module what rebuilds it: {"modules": {policy:
                                               {"num_patches", "num_features", "hidden"}}}

:func:`load_exported_policies` rebuilds each policy's networks from these two files only (JSON and safetensors,
neither of which can run code) as ``policies.token_scorer.TokenScorer``: plain torch, so that inference needs no
Ray. Re-export a checkpoint (the committed reference policy, an older run) with::

    python -m policies.export reference/marl_policy
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from cli import OneLineParser, run_command
from envs.problem import ProblemError, trained_policies
from envs.vit.backbone_checkpoint import write_weights_and_config
from policies.checkpoints import (
    MODULES_DIR,
    CheckpointInfo,
    PolicyCheckpointError,
    checkpoint_directory,
    load_rllib_policies,
)
from policies.token_scorer import TokenScorer, TokenScoring

EXPORT_DIR = "export"
WEIGHTS_FILE = "policies.safetensors"
CONFIG_FILE = "policy.json"


def export_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's export lives (it may not exist: checkpoints written before exports did not)."""
    return Path(checkpoint) / EXPORT_DIR


def has_export(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` carries an export to load instead of RLlib's pickles."""
    return (export_path(checkpoint) / CONFIG_FILE).is_file()


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
    write_weights_and_config(directory, WEIGHTS_FILE, weights, CONFIG_FILE, config)
    return directory


def export_policies(checkpoint_dir: str | os.PathLike) -> Path:
    """Export the policy of an RLlib training checkpoint (read through RLlib, i.e. unpickled: only for
    checkpoints you trained yourself) beside it; returns the export directory. A checkpoint that holds its
    export but not RLlib's modules (as shared, or ``reference/marl_policy`` without its ``learner_group``) is a
    :class:`PolicyCheckpointError` saying it is exported already: there is nothing to export it from."""
    path = checkpoint_directory(checkpoint_dir)
    if has_export(path) and not (path / MODULES_DIR).is_dir():
        raise PolicyCheckpointError(f"checkpoint {checkpoint_dir} holds its export ({export_path(checkpoint_dir)}) "
                                    f"but not RLlib's modules ({MODULES_DIR}/) to export from: it is exported "
                                    "already, and loading it reads the export")
    modules, info = load_rllib_policies(checkpoint_dir)
    return write_export(modules, info, checkpoint_dir)


def load_exported_policies(path: str | os.PathLike) -> tuple[dict[str, TokenScorer], CheckpointInfo]:
    """The policy modules (by policy name, in eval mode) and the checkpoint info of an export.

    ``path`` is the checkpoint or its ``export`` directory. Reads ``policy.json`` and
    ``policies.safetensors`` only; a missing, unreadable or inconsistent file is a
    :class:`~policies.checkpoints.PolicyCheckpointError`.
    """
    directory = Path(path).expanduser()
    if not (directory / CONFIG_FILE).is_file():
        directory = export_path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
        info = CheckpointInfo.from_json(config)
        specs = config["modules"]
        weights = load_file(str(weights_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ProblemError,
            SafetensorError) as error:
        raise PolicyCheckpointError(f"cannot read the policy export {directory}: {type(error).__name__}: "
                                    f"{' '.join(str(error).split())}") from None
    expected = set(trained_policies(info.problem.agents))
    if set(specs) != expected:
        raise PolicyCheckpointError(f"the policy export {directory} holds the policies {sorted(specs)}, but agents "
                                    f"is {info.problem.agents!r}: expected {sorted(expected)}")
    modules = {}
    for name, spec in specs.items():
        prefix = f"{name}."
        state = {key.removeprefix(prefix): value for key, value in weights.items() if key.startswith(prefix)}
        try:
            module = TokenScorer(spec["num_patches"], spec["num_features"], spec["hidden"])
            module.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as error:
            raise PolicyCheckpointError(f"the {name} policy in {directory} cannot be rebuilt: "
                                        f"{type(error).__name__}: {' '.join(str(error).split())}") from None
        modules[name] = module.eval()
    return modules, info


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m policies.export CHECKPOINT...``: export each checkpoint in place."""
    parser = OneLineParser(prog="python -m policies.export",
                           description="Write the export (safetensors + JSON, policies/export.py) of each training "
                                       "checkpoint into its directory, so that loading it opens no pickle.")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="a checkpoint directory of train.py")

    def export_each() -> int:
        for checkpoint in parser.parse_args(argv).checkpoints:
            print(f"wrote {export_policies(checkpoint)}")
        return 0

    return run_command(export_each, lambda: "interrupted: the exports printed as written are complete (each file "
                                            "is replaced whole)")


if __name__ == "__main__":
    sys.exit(main())

