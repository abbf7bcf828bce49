"""Training checkpoints: RLlib's own format, written atomically, plus what defines the pruning problem.

Layout of a run's output directory::

    <output-dir>/checkpoints/iter_000010/     one RLlib checkpoint (``Algorithm.save_to_path``) and
        pruning_config.json                   the backbone, pruning points, target ratio, env/model/PPO
        learner_group/learner/rl_module/<policy>/   each trained RLModule, loadable without Ray
    <output-dir>/best.json                    which checkpoint scored best on the validation split
    <output-dir>/progress.csv, tb/            metrics

A checkpoint is first written to ``.tmp_iter_*`` and renamed when complete, so a crash while saving never
touches the last good checkpoint, and an unfinished one is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PRUNING_CONFIG = "pruning_config.json"
RLLIB_MARKER = "rllib_checkpoint.json"
MODULES_DIR = Path("learner_group") / "learner" / "rl_module"
PREFIX = "iter_"


class PolicyCheckpointError(RuntimeError):
    """A path that is not a complete, readable training checkpoint; the message is meant for the user."""


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / PRUNING_CONFIG).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def module_path(checkpoint: str | os.PathLike, policy: str) -> Path:
    """Where RLlib keeps one trained RLModule inside an algorithm checkpoint."""
    return Path(checkpoint) / MODULES_DIR / policy


def read_pruning_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The pruning settings of a checkpoint; a clear error for anything that is not a complete one."""
    path = Path(checkpoint)
    if not path.exists():
        raise PolicyCheckpointError(f"checkpoint {path} does not exist")
    if not (path / RLLIB_MARKER).is_file() or not (path / PRUNING_CONFIG).is_file():
        raise PolicyCheckpointError(f"{path} is not a training checkpoint (no {RLLIB_MARKER} / {PRUNING_CONFIG})")
    try:
        config = json.loads((path / PRUNING_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PolicyCheckpointError(f"{path / PRUNING_CONFIG} is corrupt: {error}") from None
    for key in ("server", "env", "model_config", "iteration"):
        if key not in config:
            raise PolicyCheckpointError(f"{path / PRUNING_CONFIG} lacks '{key}'")
    return config


def write_checkpoint(algo, output_dir: str | os.PathLike, pruning_config: dict[str, Any]) -> Path:
    """Save ``algo`` as ``checkpoints/iter_<n>``: write to a temporary directory, then rename."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{pruning_config['iteration']:06d}"
    tmp, final = root / f".tmp_{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save_to_path(str(tmp))
    (tmp / PRUNING_CONFIG).write_text(json.dumps(pruning_config, indent=2) + "\n")
    if final.exists():  # a resumed run that went back past this iteration replaces its old copy
        stale = root / f".stale_{name}"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def remove_old_checkpoints(output_dir: str | os.PathLike, keep: int, protect: set[Path]) -> None:
    """Keep the newest ``keep`` checkpoints and the protected ones (the best)."""
    found = list_checkpoints(output_dir)
    for path in found[:-keep] if keep > 0 else []:
        if path.resolve() not in {p.resolve() for p in protect}:
            shutil.rmtree(path, ignore_errors=True)
