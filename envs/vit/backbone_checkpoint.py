"""Self-describing backbone checkpoints: ``model.safetensors`` + ``config.json`` in one directory.

Everything downstream (the pruning env, the ViT server, evaluation) builds the ViT only from such a
directory, so a checkpoint carries what is needed to rebuild and feed the model: the timm model name and
kwargs, classes, input size and normalisation, plus how it was made (data, splits, recipe, accuracy).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from envs.atomic_file import replaced_atomically
from envs.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_BACKBONE = REPO_ROOT / "reference" / "vit_tiny_cifar10"
REFERENCE_POLICY = REPO_ROOT / "reference" / "marl_policy"
"""The committed policy checkpoint, which evaluate.py and the benchmarks evaluate unless given another."""
NOT_A_CLONE = ("this is an install without the repository (pip install . or a wheel), so it has no reference/ "
               "files and cannot ship the code to a cluster: install a clone with pip install -e .")
"""What the commands add to an error caused by running from such an install (:func:`installed_without_repository`)."""
HUB_PROBE_TIMEOUT_S = 5.0
"""How long :func:`create_vit` waits for the Hugging Face Hub to answer before it takes pretrained weights from the
local cache only."""
RUN_EXPORT_DIR = "backbone"
"""Where backbone.py writes the checkpoint it trains, inside its ``--output-dir`` (beside its training state)."""


class CheckpointError(UserError, RuntimeError):
    """A backbone checkpoint that is missing or unreadable; the message is meant for the user as is."""


def hub_answers() -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``, through the proxies the environment names) answers a request
    within about :data:`HUB_PROBE_TIMEOUT_S`, asked with huggingface_hub's own HTTP session."""
    session, endpoint = huggingface_hub.get_session(), huggingface_hub.constants.ENDPOINT
    try:
        session.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the session's HTTP library, hence its errors, varies with huggingface_hub
        return False
    return True


@contextlib.contextmanager
def weights_from_the_cache_unless_the_hub_answers(pretrained: bool) -> Iterator[None]:
    """Hugging Face's offline mode (the local cache only) while timm loads pretrained weights, where the Hub does
    not answer: huggingface_hub would retry each weights file for about half a minute, logging every try."""
    constants = huggingface_hub.constants
    if not pretrained or constants.HF_HUB_OFFLINE or hub_answers():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


TIMM_KWARG_ERRORS = (RuntimeError, TypeError, ValueError, AssertionError, KeyError, ZeroDivisionError)
"""What timm's models raise on keyword arguments they cannot build or run with: an unknown kwarg, ``embed_dim``
that ``num_heads`` does not divide, ``act_layer='foo'`` (a ``KeyError`` of timm's layer lookup), ``num_heads=0``
or ``patch_size=0`` (a division by zero), a tensor of a negative size (``mlp_ratio=-1``, ``depth=-1``: a
``RuntimeError``)."""


def create_vit(model_name: str, num_classes: int, model_kwargs: dict[str, Any],
               pretrained: bool = False) -> torch.nn.Module:
    """A timm model by name; a clear error for unknown names, for kwargs timm cannot build with
    (:data:`TIMM_KWARG_ERRORS`) and for unreachable pretrained weights, which come from the local cache only where
    the Hub does not answer. Where weights are loaded, an ``OSError`` or a ``RuntimeError`` is theirs (a file not
    in the cache, one that does not read); without them, an ``OSError`` is no user error and keeps its traceback."""
    if not timm.is_model(model_name):
        raise CheckpointError(f"unknown timm model {model_name!r}")
    weights_errors = (OSError, RuntimeError) if pretrained else ()
    try:
        with weights_from_the_cache_unless_the_hub_answers(pretrained):
            return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except weights_errors as error:
        raise CheckpointError(f"could not load pretrained weights for {model_name} (offline?): {error}") from None
    except TIMM_KWARG_ERRORS as error:
        raise CheckpointError(f"timm cannot build {model_name} with {model_kwargs}: {timm_error(error)}") from None


def timm_error(error: Exception) -> str:
    """``error``'s message as the end of a line that says timm could not build or run a model: its class too where
    the message alone means nothing (a ``KeyError``'s is the key, a bare ``AssertionError`` has none)."""
    if isinstance(error, KeyError) or not str(error):
        return f"{type(error).__name__} {error}".strip()
    return str(error)


def save_backbone(model: torch.nn.Module, config: dict[str, Any], directory: str | os.PathLike,
                  half: bool = False) -> Path:
    """Write weights (optionally as float16) and config; each file is replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    config = {**config, "weights_dtype": str(dtype).removeprefix("torch.")}
    write_weights_and_config(directory, WEIGHTS_FILE, state, CONFIG_FILE, config)
    return directory


def write_weights_and_config(directory: Path, weights_file: str, state: dict[str, torch.Tensor], config_file: str,
                             config: dict[str, Any]) -> None:
    """Write ``state`` as safetensors, then ``config`` as JSON, into ``directory``; each file is replaced
    atomically, so a reader never sees half of one (also the policy export's format, ``policies.export``)."""
    with replaced_atomically(directory / weights_file) as staging:
        save_file(state, str(staging))
    with replaced_atomically(directory / config_file) as staging:
        staging.write_text(json.dumps(config, indent=2) + "\n")


def installed_without_repository() -> bool:
    """Whether the code runs from site-packages rather than a clone of the repository (an editable install)."""
    return not (REPO_ROOT / "pyproject.toml").is_file()


POLICY_FILES = ("pruning_config.json", "policy.json")
"""What a policy checkpoint and its export hold: their names, which ``policies.checkpoints`` (it imports this
module) takes from here; a directory holding one, given as a backbone, is named a policy checkpoint."""


def read_backbone_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a backbone checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).exists():
        in_repository = Path(directory).resolve().is_relative_to(REPO_ROOT)
        raise CheckpointError(f"backbone checkpoint {directory} does not exist"
                              + (f" ({NOT_A_CLONE})" if in_repository and installed_without_repository() else ""))
    if not path.is_file():
        export = Path(directory) / RUN_EXPORT_DIR
        hint = f"; backbone.py's run there wrote its checkpoint to {export}" if is_backbone_checkpoint(export) else ""
        if any((Path(directory) / name).is_file() for name in POLICY_FILES):
            hint = (": it is a policy checkpoint, which names its backbone itself (evaluate.py --checkpoint PATH, "
                    "PrunedViT.from_checkpoint)")
        raise CheckpointError(f"{directory} is not a backbone checkpoint (no {CONFIG_FILE}){hint}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    missing = {"model_name", "model_kwargs", "num_classes", "input_size", "mean", "std"} - set(config)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(sorted(missing))}")
    wrong = [f"{key} {must}" for key, fits, must in _config_rules(config) if not fits]
    if wrong:
        raise CheckpointError(f"{path}: {'; '.join(wrong)}")
    return config


def _config_rules(config: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """What each field of a backbone config must be, as (field, whether it is, what it must be): a hand-edited
    config fails here in one line, not deep inside a forward."""
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def channels(value: Any, low: float) -> bool:  # one number per colour channel, each above ``low``
        return (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) and v > low for v in value))
    names = config.get("class_names")
    return [("model_name", isinstance(config["model_name"], str), "must be a timm model's name"),
            ("model_kwargs", isinstance(config["model_kwargs"], dict), "must be an object of keyword arguments"),
            ("num_classes", positive_int(config["num_classes"]), "must be a positive integer"),
            ("input_size", positive_int(config["input_size"]), "must be a positive integer (pixels)"),
            ("mean", channels(config["mean"], -math.inf), "must be 3 numbers, one per colour channel"),
            ("std", channels(config["std"], 0), "must be 3 positive numbers, one per colour channel"),
            ("class_names", names is None or (isinstance(names, list) and len(names) == config["num_classes"]
                                              and all(isinstance(name, str) for name in names)),
             "must name each of the num_classes classes")]


def stored_backbone_path(stored: str | os.PathLike) -> Path:
    """A backbone path as a policy checkpoint stores it: relative paths are relative to the repository."""
    path = Path(stored).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def repository_relative(path: str | os.PathLike) -> str:
    """``path`` (relative to the working directory) as checkpoints and results files record it: relative to the
    repository when it lies inside it, so that what is committed names no machine's directories; else
    absolute. :func:`stored_backbone_path` reads it back."""
    resolved = Path(path).expanduser().resolve()
    return (resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else resolved).as_posix()


def is_backbone_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a backbone checkpoint (its weights and ``config.json``), as backbone.py writes."""
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / WEIGHTS_FILE).is_file()


def load_backbone(directory: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the timm model of a checkpoint directory in float32, on the CPU, in eval mode, with its config."""
    config = read_backbone_config(directory)
    try:
        state = load_file(str(Path(directory) / WEIGHTS_FILE))
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"cannot read weights in {directory}: {error}") from None
    return vit_from_state(state, config, directory), config


def vit_from_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   source: str | os.PathLike = "the state given") -> torch.nn.Module:
    """The timm model a backbone checkpoint's ``config`` names, holding ``state`` (its weights, floating point ones
    in float32), in eval mode; a :class:`CheckpointError` naming ``source`` where they do not fit it."""
    model = create_vit(config["model_name"], config["num_classes"], config["model_kwargs"])
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as error:
        raise CheckpointError(f"weights in {source} do not fit {config['model_name']}: {error}") from None
    return model.eval()


def weights_digest(directory: str | os.PathLike) -> str | None:
    """A digest of a backbone checkpoint's weights file (SHA-256, 16 hex digits), or None where it does not read:
    what a policy checkpoint records of the weights its agents learned on, which a backbone trained further in
    place changes under the same path."""
    digest = hashlib.sha256()
    try:
        with (Path(directory) / WEIGHTS_FILE).open("rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:16]


def normalize(images: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` images to the float input the checkpoint expects (its mean and std)."""
    mean, std = _mean_std(tuple(config["mean"]), tuple(config["std"]), images.device)
    return (images.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per device: a new tensor per call would be a host-to-GPU copy per training step."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))
