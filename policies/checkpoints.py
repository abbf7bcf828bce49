"""Training checkpoints: RLlib's own format plus what defines the pruning problem, kept by Ray Tune.

Layout of a run's output directory (``train.py --output-dir``, Tune's experiment directory)::

    <output-dir>/<trial>/                     one trial (e.g. ``target_ratio=0.5``): Tune's progress.csv,
                                              result.json and TensorBoard events
    <output-dir>/<trial>/checkpoint_000003/   one RLlib checkpoint (``Algorithm.save_to_path``) and
                                              (``unrecorded_checkpoint_000004/``: one that Tune had not
                                              recorded when the run was killed, set aside on --resume)
        pruning_config.json                   what the checkpoint says about itself (``CheckpointInfo.to_json``:
                                              the problem, iteration, validation score, commit, backbone digest,
                                              versions)
        learner_group/learner/rl_module/<policy>/   each trained RLModule, pickled: read with Ray (:func:`load_module`)
        export/                               the policy modules as safetensors + JSON (``policies.export``
                                              writes it, :func:`load_exported_policies` reads it): what
                                              inference loads, never unpickling

A checkpoint (export included) is staged complete in a temporary directory
(``policies.export.stage_checkpoint``) and only then reported to Tune, which copies it to the run's storage and
records it; a crash while saving leaves the recorded checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from cli import versions_line
from envs.errors import UserError, one_line
from envs.problem import ProblemError, PruningProblem
from envs.vit.backbone_checkpoint import POLICY_FILES, is_backbone_checkpoint, weights_digest
from envs.vit.features import AGENT_FEATURES
from policies.decisions import trained_policies
from policies.token_scorer import TokenScorer, TokenScoring

PRUNING_CONFIG, EXPORT_CONFIG = POLICY_FILES  # a checkpoint's record, its export's config
MODULES_DIR = Path("learner_group", "learner", "rl_module")
CHECKPOINT_PREFIX = "checkpoint_"  # Tune's name for a trial's checkpoint directories
UNRECORDED_PREFIX = "unrecorded_"  # put before the name of a checkpoint Tune has no record of: out of its numbering
Modules = Mapping[str, TokenScoring]

EXPORT_DIR = "export"  # a checkpoint's policy export (policies.export writes it)
EXPORT_WEIGHTS = "policies.safetensors"


def export_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's export lives (it may not exist: a checkpoint may have none)."""
    return Path(checkpoint) / EXPORT_DIR


def is_export(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a policy export itself, under any name: an export is shared alone, and renamed."""
    return (Path(directory) / EXPORT_CONFIG).is_file()


def has_export(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` carries an export to load instead of RLlib's pickles."""
    return is_export(export_path(checkpoint))


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``pruning_config.json`` says about a checkpoint."""

    problem: PruningProblem
    iteration: int | None = None
    val_score: float | None = None  # the validation score it was selected by, if validated
    commit: str | None = None  # the code's commit (cli.code_commit) where train.py ran, if known
    backbone_digest: str | None = None  # of the weights the agents learned on (weights_digest), if recorded
    # the packages' versions the record was written with (None: this process's); provenance, not the checkpoint
    versions: str | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        """What ``pruning_config.json`` holds, with the versions of the packages that wrote it: those the record
        read carries, so that an export written later, in another environment, says what trained the policy
        and an export written again is byte-identical; else this process's (a checkpoint being stored)."""
        return {"problem": self.problem.to_json(), "iteration": self.iteration, "val_score": self.val_score,
                "commit": self.commit, "backbone_digest": self.backbone_digest,
                "versions": self.versions or versions_line()}

    @classmethod
    def from_json(cls, config: dict) -> CheckpointInfo:
        """Read back :meth:`to_json` (and the layouts of older checkpoints, ``PruningProblem.from_checkpoint_json``);
        a :class:`~envs.problem.ProblemError` or ``TypeError`` for a problem that does not read."""
        return cls(PruningProblem.from_checkpoint_json(config), config.get("iteration"), config.get("val_score"),
                   config.get("commit"), config.get("backbone_digest"), config.get("versions"))

    def warn_if_backbone_changed(self, checkpoint: str | os.PathLike, backbone: str | os.PathLike) -> None:
        """A warning where the weights in ``backbone`` are not those the agents learned on: their choices were
        learned for other features, and a policy that runs on another backbone of the same patch grid (another
        seed, another width: the agents take features, not embeddings) prunes it as it was never taught to.
        Under the path the checkpoint records, that is a backbone trained further in place; elsewhere, another
        backbone given in its stead. The digest decides, not the path: a copy of the same weights is silent."""
        if self.backbone_digest is None:  # a checkpoint that records no digest: nothing to compare
            return
        found = weights_digest(backbone)
        if found is None or found == self.backbone_digest:
            return
        if Path(backbone).resolve() == self.problem.backbone_path.resolve():
            warnings.warn(f"the weights of backbone {backbone} have changed since checkpoint {checkpoint} was trained "
                          f"on them (trained further in place?): its agents learned on the earlier ones; retrain them "
                          f"(train.py --from-checkpoint) to prune this backbone as learned", stacklevel=2)
        else:
            warnings.warn(f"the weights of backbone {backbone} are not those checkpoint {checkpoint} was trained on "
                          f"(another backbone, seed or width?): its agents learned on {self.problem.backbone_path}; "
                          f"train agents on this backbone (train.py --backbone) to prune it as learned", stacklevel=2)


class PolicyCheckpointError(UserError, RuntimeError):
    """A path that is not a complete, readable training checkpoint; the message is meant for the user."""


def trial_directories(run_dir: str | os.PathLike) -> list[Path]:
    """The directories of a run's trials, by name, as their checkpoints find them: every directory in ``run_dir``
    (one that is no trial's holds no checkpoint), not Tune's records of the run, so that a run copied without them,
    or one whose records a full disk cut short, lists too."""
    return sorted(path for path in Path(run_dir).glob("*") if path.is_dir())


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run's trials, by trial name, oldest first."""
    return [c for trial in trial_directories(output_dir) for c in trial_checkpoints(trial)]


def trial_checkpoints(trial_dir: str | os.PathLike) -> list[Path]:
    """A trial's complete checkpoints (those with their ``pruning_config.json``), Tune's and those set aside as
    :data:`UNRECORDED_PREFIX`, oldest first by the iteration they hold (a resumed trial can write a later iteration
    into a lower-numbered directory)."""
    found = [path for path in numbered_checkpoint_directories(trial_dir) if (path / PRUNING_CONFIG).exists()]
    return sorted(found, key=_iteration_order)


def incomplete_checkpoints(trial_dir: str | os.PathLike) -> list[Path]:
    """A trial's checkpoint directories, Tune's and those set aside, that lack their ``pruning_config.json`` (one
    cut short while it was stored, or the file removed), by name: what :func:`trial_checkpoints` passes over."""
    return sorted(path for path in numbered_checkpoint_directories(trial_dir) if not (path / PRUNING_CONFIG).exists())


def numbered_checkpoint_directories(trial_dir: str | os.PathLike, set_aside: bool = True) -> list[Path]:
    """A trial's numbered checkpoint directories (:func:`checkpoint_number`), complete or not: Tune's, and with
    ``set_aside`` those set aside as :data:`UNRECORDED_PREFIX` too, what :func:`trial_checkpoints` and
    :func:`incomplete_checkpoints` divide between them; without, those Tune's numbering goes on among."""
    prefixes = (CHECKPOINT_PREFIX, UNRECORDED_PREFIX + CHECKPOINT_PREFIX) if set_aside else (CHECKPOINT_PREFIX,)
    return [path for prefix in prefixes
            for path in Path(trial_dir).glob(f"{prefix}*") if path.is_dir() and checkpoint_number(path) is not None]


def checkpoint_number(checkpoint: Path) -> int | None:
    """The number Tune gave a checkpoint directory (``checkpoint_000003``, set aside or not: 3), None for a name
    that is not one of Tune's numbered ones."""
    name = checkpoint.name.removeprefix(UNRECORDED_PREFIX)
    number = name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def _iteration_order(checkpoint: Path) -> tuple[int, int]:
    """``(iteration, directory number)``; an unreadable ``pruning_config.json`` counts as iteration -1."""
    info = readable_checkpoint_info(checkpoint)
    iteration = info.iteration if info is not None and info.iteration is not None else -1
    return iteration, checkpoint_number(checkpoint)


RESTORED_STATES = (Path("algorithm_state.pkl"), Path("learner_group", "state.pkl"),
                   Path("learner_group", "learner", "state.pkl"))
"""What restoring an RLlib checkpoint of this project reads, besides each module's ``module_state.pkl``."""


def check_restorable(checkpoint: str | os.PathLike) -> None:
    """Raise a PolicyCheckpointError unless an RLlib checkpoint holds the states a restore reads
    (:data:`RESTORED_STATES` and each module's) and every pickled part of it reads (a file cut short by a crash or
    a copy does not), so that a run fails before it starts, not in its trial."""
    checkpoint = Path(checkpoint)
    for path in sorted(checkpoint.rglob("*.pkl")):
        try:
            with path.open("rb") as file:
                pickle.load(file)
        except Exception as error:  # noqa: BLE001 - a damaged pickle fails in many ways
            raise PolicyCheckpointError(f"{checkpoint} cannot be restored: {path.relative_to(checkpoint)} does not "
                                        f"read ({type(error).__name__}: {error})") from None
    modules = sorted(path for path in (checkpoint / MODULES_DIR).glob("*") if path.is_dir())
    required = [*RESTORED_STATES, *(path.relative_to(checkpoint) / "module_state.pkl" for path in modules)]
    missing = [str(path) for path in required if not (checkpoint / path).is_file()]
    if missing or not modules:
        raise PolicyCheckpointError(f"{checkpoint} cannot be restored: it lacks "
                                    f"{', '.join(missing) or MODULES_DIR.as_posix() + '/<policy>'}")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run of one trial (of the last trial by name, for several)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def module_path(checkpoint: str | os.PathLike, policy: str) -> Path:
    """Where RLlib keeps one trained RLModule inside an algorithm checkpoint."""
    return Path(checkpoint) / MODULES_DIR / policy


def is_policy_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a policy checkpoint, as train.py writes one (its ``pruning_config.json``)."""
    return (Path(directory) / PRUNING_CONFIG).is_file()


def holds_policies(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is what :func:`load_policies` reads: a policy checkpoint or an export."""
    return is_policy_checkpoint(directory) or is_export(directory)


def read_checkpoint_info(checkpoint: Path) -> CheckpointInfo:
    """``pruning_config.json`` of a policy checkpoint: its problem (older layouts too), iteration and score."""
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
    if not isinstance(config, dict):
        raise PolicyCheckpointError(f"{path} does not hold a JSON object")
    try:
        return CheckpointInfo.from_json(config)
    except (ProblemError, TypeError) as error:
        raise PolicyCheckpointError(f"{path}: {error}") from None


def validation_rank(val_score: float, iteration: int | None) -> tuple[float, int]:
    """How checkpoints rank on validation, here and in train.py's closing lines: the highest score first, the
    latest iteration of equals, as Tune's ``CheckpointConfig(num_to_keep=...)`` ranks a trial's checkpoints (of
    equal scores, the later reported ranks higher), so that the best named is the one Tune keeps longest rather
    than the first of equals it deletes."""
    return val_score, iteration or 0


def validated_checkpoints(checkpoints: Iterable[Path]) -> list[tuple[Path, CheckpointInfo]]:
    """Those of ``checkpoints`` whose record reads and holds a validation score, each with its record."""
    return [(path, info) for path in checkpoints
            if (info := readable_checkpoint_info(path)) is not None and info.val_score is not None]


def best_on_validation(checkpoints: Iterable[Path]) -> Path | None:
    """The checkpoint of ``checkpoints`` that ranks first on validation (:func:`validation_rank`); None when none
    was validated."""
    validated = validated_checkpoints(checkpoints)
    if not validated:
        return None
    return max(validated, key=lambda entry: validation_rank(entry[1].val_score, entry[1].iteration))[0]


def _run_directory_hint(directory: Path) -> str:
    """For a train.py output directory or one of its trials' directories, where its best checkpoint on validation
    is; for a backbone checkpoint, what takes one."""
    if is_backbone_checkpoint(directory):
        return ("; it is a backbone checkpoint, which the heuristics run on (evaluate.py --heuristics-only --backbone "
                "PATH, PrunedViT.from_heuristic) and train.py --backbone trains agents on")
    best = best_on_validation(list_checkpoints(directory) or trial_checkpoints(directory))
    return f"; the best checkpoint of this training run on validation is {best}" if best is not None else ""


def readable_checkpoint_info(checkpoint: Path) -> CheckpointInfo | None:
    """:func:`read_checkpoint_info`, None for a checkpoint whose record does not read."""
    try:
        return read_checkpoint_info(checkpoint)
    except PolicyCheckpointError:
        return None


def load_module(path: Path, name: str) -> TokenScoring:
    """The ``name`` policy's RLModule saved in the directory ``path``, in eval mode; any failure to restore it
    (truncated, corrupt) is a user error. ``path`` must be absolute: RLlib reads a relative one as a URI. The
    one reader of policies that needs Ray (the export does not)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    try:
        module = RLModule.from_checkpoint(str(path))
    except Exception as error:  # unpickling a damaged file can raise nearly anything
        message = one_line(error) or "no details"
        raise PolicyCheckpointError(f"cannot load the {name} policy from {path}: {type(error).__name__}: "
                                    f"{message}") from None
    return module.eval()


def load_exported_policies(path: str | os.PathLike) -> tuple[dict[str, TokenScorer], CheckpointInfo]:
    """The policy modules (by policy name, in eval mode) and the checkpoint info of an export.

    ``path`` is the checkpoint or an export (its ``export`` folder, or one shared under another name). Reads
    ``policy.json`` and ``policies.safetensors`` only; a missing, unreadable or inconsistent file is a
    :class:`PolicyCheckpointError`.
    """
    directory = Path(path).expanduser()
    if not is_export(directory):
        directory = export_path(directory)
    config_path, weights_path = directory / EXPORT_CONFIG, directory / EXPORT_WEIGHTS
    try:
        config = json.loads(config_path.read_text())
        info = CheckpointInfo.from_json(config)
        specs = config["modules"]
        weights = load_file(str(weights_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ProblemError,
            SafetensorError) as error:
        raise PolicyCheckpointError(f"cannot read the policy export {directory}: {type(error).__name__}: "
                                    f"{one_line(error)}") from None
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
                                        f"{type(error).__name__}: {one_line(error)}") from None
        modules[name] = module.eval()
    return modules, info


def load_policies(checkpoint: str | Path) -> tuple[dict[str, TokenScoring], CheckpointInfo]:
    """The policy modules a checkpoint trained (by policy name) and what it says about itself.

    Reads the checkpoint's export (``policies.export``: safetensors and JSON, never a pickle) when it has
    one or is one, else RLlib's files (:func:`load_rllib_policies`, a checkpoint without an export), with a
    warning: those pickles run the code of whoever wrote them.
    """
    path = checkpoint_directory(checkpoint)
    if is_export(path) or has_export(path):
        return load_exported_policies(path)
    read_checkpoint_info(path)  # what is no checkpoint is refused before the warning about its pickles
    warnings.warn(f"{path} has no export: its policies are read from RLlib's pickled files, which run code of "
                  f"whoever wrote them (load only checkpoints you trust; python -m policies.export writes an export)",
                  stacklevel=2)
    return load_rllib_policies(path)


def checkpoint_directory(checkpoint: str | Path) -> Path:
    """``checkpoint`` as an absolute path (RLlib loads from URIs: a relative path is not one), if a directory;
    a checkpoint's ``export`` folder given itself (what is shared to avoid pickles) stands for the checkpoint."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.exists():
        raise PolicyCheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise PolicyCheckpointError(f"checkpoint {path} is not a directory")
    return path.parent if path.name == EXPORT_DIR and has_export(path.parent) else path


def load_rllib_policies(checkpoint: str | Path) -> tuple[dict[str, TokenScoring], CheckpointInfo]:
    """The policy modules of a checkpoint read through RLlib (unpickled), and its ``pruning_config.json``.

    A run whose ``agents`` names one agent has only that module; a ``both`` run must have both.
    """
    path = checkpoint_directory(checkpoint)
    info = read_checkpoint_info(path)
    return rllib_modules(path, info.problem.agents), info


def rllib_modules(checkpoint: Path, agents: str) -> dict[str, TokenScoring]:
    """The RLModules (by policy name) that a checkpoint trained with ``agents`` must hold, unpickled."""
    modules = {}
    for name in trained_policies(agents):
        directory = module_path(checkpoint, name)
        if not directory.is_dir():
            raise PolicyCheckpointError(f"checkpoint {checkpoint} has no {name} policy (expected "
                                        f"{MODULES_DIR / name}; agents is {agents!r})")
        modules[name] = load_module(directory, name)
    return modules


def check_policies(modules: Modules, num_patches: int, checkpoint: Path | str) -> None:
    """Fail clearly when a module was built for another backbone (patch count) or feature set."""
    for name, module in modules.items():
        expected = (num_patches, len(AGENT_FEATURES[name]))
        if tuple(module.token_shape) != expected:
            raise PolicyCheckpointError(
                f"the {name} policy in {checkpoint} observes tokens {tuple(module.token_shape)}, but the backbone "
                f"has {num_patches} patch tokens and there are {expected[1]} {name} features, so it expects tokens "
                f"{expected}: was it trained on another backbone?")
