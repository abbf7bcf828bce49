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

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ray.rllib.core.rl_module.rl_module import RLModule

from envs.features import ATTENTION_FEATURES, SIMILARITY_FEATURES
from envs.pruning_env import AGENT_MODES, trained_policies
from envs.token_merge import REDUCTIONS

PRUNING_CONFIG = "pruning_config.json"
MODULES_DIR = Path("learner_group", "learner", "rl_module")
PREFIX = "iter_"
FEATURES = {"attention": ATTENTION_FEATURES, "similarity": SIMILARITY_FEATURES}
Modules = Mapping[str, RLModule]


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


@contextlib.contextmanager
def _quiet_ray_deprecations() -> Iterator[None]:
    """RLlib logs a deprecation warning for every module it restores; it says nothing to our users."""
    logger = logging.getLogger("ray._common.deprecation")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_pruning_config(checkpoint: Path) -> dict[str, Any]:
    """``pruning_config.json`` of a policy checkpoint, checked for what evaluation needs."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise PolicyCheckpointError(f"checkpoint {checkpoint} does not exist")
    path = checkpoint / PRUNING_CONFIG
    if not path.is_file():
        raise PolicyCheckpointError(f"{checkpoint} is not a policy checkpoint (no {PRUNING_CONFIG}; train.py "
                              f"writes one in each checkpoint){_run_directory_hint(checkpoint)}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PolicyCheckpointError(f"{path} is not readable JSON: {error}") from None
    server = config.get("server") if isinstance(config, dict) else None
    if not isinstance(server, dict) or not {"backbone", "prune_points", "target_ratio"} <= set(server):
        raise PolicyCheckpointError(f"{path} lacks server.backbone, server.prune_points or server.target_ratio")
    env = config.get("env") or {}
    agents = env.get("agents", "both") if isinstance(env, dict) else None
    if agents not in AGENT_MODES:
        raise PolicyCheckpointError(f"{path}: env.agents must be 'both', 'attention' or 'similarity', not {agents!r}")
    ratio = server["target_ratio"]
    if not isinstance(ratio, int | float) or not 0.0 < ratio < 1.0:
        raise PolicyCheckpointError(f"{path}: server.target_ratio must be in (0, 1), got {ratio!r}")
    server.setdefault("reduction", "drop")  # runs from before token merging existed dropped tokens
    if server["reduction"] not in REDUCTIONS:
        raise PolicyCheckpointError(f"{path}: server.reduction must be one of {REDUCTIONS}, "
                                    f"got {server['reduction']!r}")
    return config


def _run_directory_hint(directory: Path) -> str:
    """For a train.py output directory, where its best checkpoint is (train.py's best.json)."""
    try:
        best = json.loads((directory / "best.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f"; for the best checkpoint of this training run pass --checkpoint {directory / best}"


def checkpoint_agents(config: Mapping[str, Any]) -> str:
    """``both``, ``attention`` or ``similarity``: which agents the checkpoint's run trained."""
    return (config.get("env") or {}).get("agents", "both")


def _load_module(path: Path, name: str) -> RLModule:
    """One RLModule, in eval mode; any failure to restore it (truncated, corrupt) is a user error."""
    try:
        with _quiet_ray_deprecations():
            module = RLModule.from_checkpoint(str(path))
    except Exception as error:  # unpickling a damaged file can raise nearly anything
        message = " ".join(str(error).split()) or "no details"
        raise PolicyCheckpointError(f"cannot load the {name} policy from {path}: {type(error).__name__}: "
                              f"{message}") from None
    return module.eval()


def load_policies(checkpoint: str | Path) -> tuple[dict[str, RLModule], dict[str, Any]]:
    """The policy modules a checkpoint trained (by policy name) and its ``pruning_config.json``.

    A run with ``env.agents`` naming one agent has only that module; a ``both`` run must have both.
    """
    path = Path(checkpoint).expanduser().resolve()  # RLlib loads from URIs: a relative path is not one
    if not path.exists():
        raise PolicyCheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise PolicyCheckpointError(f"checkpoint {path} is not a directory")
    config = read_pruning_config(path)
    agents = checkpoint_agents(config)
    modules = {}
    for name in trained_policies(agents):
        directory = module_path(path, name)
        if not directory.is_dir():
            raise PolicyCheckpointError(f"checkpoint {path} has no {name} policy (expected {MODULES_DIR / name}; "
                                  f"env.agents is {agents!r})")
        modules[name] = _load_module(directory, name)
    return modules, config


def check_policies(modules: Modules, num_patches: int, checkpoint: Path | str) -> None:
    """Fail clearly when a module was built for another backbone (patch count) or feature set."""
    n = num_patches
    for name, module in modules.items():
        space = getattr(module, "observation_space", None)
        try:
            shapes = (tuple(space["tokens"].shape), tuple(space["live"].shape))
        except (KeyError, TypeError):
            raise PolicyCheckpointError(f"the {name} policy in {checkpoint} does not observe "
                                  f"{{'tokens', 'live'}} (observation space {space})") from None
        expected = ((n, len(FEATURES[name])), (n,))
        if shapes != expected:
            raise PolicyCheckpointError(
                f"the {name} policy in {checkpoint} observes tokens {shapes[0]} and live {shapes[1]}, but the "
                f"backbone has {n} patch tokens and there are {len(FEATURES[name])} {name} features, so it "
                f"expects tokens {expected[0]}: was it trained on another backbone?")


def write_checkpoint(algo, output_dir: str | os.PathLike, pruning_config: dict[str, Any]) -> Path:
    """Save ``algo`` as ``checkpoints/iter_<n>``: write to a temporary directory, then rename."""
    root = checkpoints_dir(output_dir).resolve()  # RLlib saves to URIs: a relative path is not one
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
