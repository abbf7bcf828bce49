"""What defines a pruning problem: one frozen dataclass, validated once, stored in every checkpoint.

:class:`PruningProblem` holds everything that fixes what the agents learn and how: the backbone and the
data, where and how much to prune, what removed tokens become, which agents act, the reward weights, the
policy width and the PPO settings (:class:`PPOSettings`). Each field carries a one-line doc that is also
its ``--flag`` help (:func:`add_problem_arguments`), and ``__post_init__`` is the only place a value is
checked. ``train.py`` builds it from the command line, stores it as JSON in every checkpoint under its
own key and reads it back on ``--resume``; ``evaluate.py`` reads it from the checkpoint it evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import numbers
import re
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli import MAX_SEED, comma_separated, named_directory
from envs.errors import UsageError
from envs.vit.backbone_checkpoint import (
    REFERENCE_BACKBONE,
    read_backbone_config,
    repository_relative,
    stored_backbone_path,
)
from envs.vit.data import DATASETS, DEFAULT_SPLIT_SEED, DEFAULT_VAL_SIZE, default_data_dir
from envs.vit.held_out import held_out_split
from envs.vit.staged_vit import DEFAULT_PRUNE_POINTS
from envs.vit.token_merge import REDUCTIONS
from policies.decisions import DEFAULT_PROTECTED_SHARE, POLICIES, trained_policies
from policies.heuristics import HEURISTICS, SIMILARITY_HEURISTICS
from policies.token_scorer import DEFAULT_HIDDEN

UNRECORDED_PROTECTED_SHARE = 0.25
"""The share the attention agent protected in a checkpoint that records ``rollouts_per_image`` but no
``protected_share``."""
UNRECORDED_SETTINGS: dict[str, Any] = {"rollouts_per_image": 1, "reward_baseline": "none"}
"""How a checkpoint that records none of these settings was trained (one rollout of each image, no baseline),
where the defaults differ."""
AGENT_MODES: tuple[str, ...] = ("both", *POLICIES)
WARM_STARTS: tuple[str, ...] = ("none", *SIMILARITY_HEURISTICS)


class ProblemError(UsageError):
    """A setting outside its allowed values; the message is meant for the user as is. A :class:`UsageError`, as
    every bad argument is, so that a Python caller catches a bad budget as it catches a bad reduction."""


def setting(default: Any, doc: str, *, choices: tuple[str, ...] | None = None, factory: bool = False,
            ratio: bool = False, shown: str | None = None) -> Any:
    """A dataclass field with its one-line doc (the ``--flag`` help) and, for strings, its choices; ``ratio``: a
    removal ratio, whose flag reads a sweep of them as :data:`removal_ratio_sweep` (each in (0, 1), the whole
    value in the message of one that is not), not as any number; ``shown``: how ``--help`` words the default
    where its value (None, an empty tuple) says nothing to a user."""
    metadata = {"doc": doc, "choices": choices, "ratio": ratio, "shown": shown}
    if factory:
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_target_ratio(value: float, name: str = "target_ratio") -> float:
    """``value`` (a number of Python's, numpy's or any other ``numbers.Real``) as a float if it is a fraction of
    tokens to remove, in (0, 1); else a :class:`ProblemError`."""
    _check_real(value, name)
    if not 0.0 < value < 1.0:
        raise ProblemError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_protected_share(value: float) -> float:
    """``value`` as a float if it is a share of each pruning point's kept tokens the attention agent may protect,
    in (0, 1]; else a :class:`ProblemError`."""
    _check_real(value, "protected_share")
    if not 0.0 < value <= 1.0:
        raise ProblemError(f"protected_share must be in (0, 1], got {value!r}")
    return float(value)


def _check_real(value: Any, name: str) -> None:
    """A :class:`ProblemError` for what is no real number (a bool, a string, a tensor: ``float(tensor)`` of one
    value works, but a tensor budget is more likely a mistake than a choice)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProblemError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ProblemError(message)


def _check_types(settings: PPOSettings | PruningProblem) -> None:
    """Each field of ``settings`` of its annotated kind: ``float`` a finite number (an infinite reward weight
    makes the leave-one-out baseline NaN), ``int`` an integer, not a bool; ``bool`` true or false (RLlib reads
    the string "no" as true); tuples made tuples (a list, as JSON
    or the Python API may give, would leave the problem unhashable and unequal to its JSON round trip)."""
    for spec in dataclasses.fields(settings):
        value, kind = getattr(settings, spec.name), spec.type
        if kind == "float":
            _check(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
                   f"{spec.name} must be a finite number, got {value!r}")
        elif kind in ("int", "int | None"):
            _check((value is None and kind == "int | None") or (isinstance(value, int) and not isinstance(value, bool)),
                   f"{spec.name} must be an integer, got {value!r}")
        elif kind == "bool":
            _check(isinstance(value, bool), f"{spec.name} must be true or false, got {value!r}")
        elif kind.startswith("tuple"):
            _check(isinstance(value, tuple | list), f"{spec.name} must be a sequence, got {value!r}")
            object.__setattr__(settings, spec.name, tuple(value))


@dataclass(frozen=True)
class PPOSettings:
    """RLlib PPO settings; docs/DESIGN.md ("PPO settings") says why the defaults are what they are."""

    lr: float = setting(1e-4, "learning rate (higher rates undid the warm start, docs/DESIGN.md)")
    gamma: float = setting(0.99, "discount; an episode is one step per agent turn")
    lambda_: float = setting(0.95, "GAE lambda")
    clip_param: float = setting(0.2, "PPO's clip of the probability ratio")
    entropy_coeff: float = setting(0.0, "entropy bonus (a set's entropy grows with its size)")
    num_epochs: int = setting(4, "SGD passes over each iteration's batch")
    minibatch_size: int = setting(128, "agent steps per SGD minibatch")
    train_batch_size_per_learner: int = setting(4096, "agent steps sampled per iteration, as RLlib counts them: every "
                                                 "observation an agent receives, 2P + 1 per rollout for its 2P "
                                                 "decisions at P pruning points")
    vf_loss_coeff: float = setting(0.5, "weight of the value loss")
    use_kl_loss: bool = setting(False, "add PPO's adaptive KL penalty")
    grad_clip: float = setting(1.0, "global gradient-norm clip")

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        _check(0 <= self.lambda_ <= 1, f"lambda must be in [0, 1], got {self.lambda_}")
        _check(self.clip_param > 0, f"clip_param must be > 0, got {self.clip_param}")
        _check(self.entropy_coeff >= 0, f"entropy_coeff must be >= 0, got {self.entropy_coeff}")
        _check(self.num_epochs >= 1, f"num_epochs must be >= 1, got {self.num_epochs}")
        _check(1 <= self.minibatch_size <= self.train_batch_size_per_learner,
               f"minibatch_size must be in [1, train_batch_size_per_learner = {self.train_batch_size_per_learner}]"
               f", got {self.minibatch_size}")
        _check(self.vf_loss_coeff >= 0, f"vf_loss_coeff must be >= 0, got {self.vf_loss_coeff}")
        _check(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")


@dataclass(frozen=True)
class PruningProblem:
    """What the agents learn and how they are trained; see docs/DESIGN.md for each part."""

    backbone: str = setting(repository_relative(REFERENCE_BACKBONE),
                            "backbone checkpoint directory (backbone.py writes one)")
    dataset: str = setting("cifar10", "data set (train.py: the backbone's, where it records one)", choices=DATASETS)
    data_dir: str = setting(default_data_dir, "directory holding the data set ($MARL_PRUNING_DATA_DIR, else ./data)",
                            factory=True)
    train_limit: int | None = setting(None, "sample from a seeded subset of this many train images",
                                      shown="every train image")
    val_size: int = setting(DEFAULT_VAL_SIZE, "validation images held out of the training split; train.py holds "
                                              "out the backbone's where it records them, else this default")
    split_seed: int = setting(DEFAULT_SPLIT_SEED, "seed of the train/validation split; train.py takes the "
                                                  "backbone's where it records it, else this default")
    val_limit: int = setting(1000, "validation images scored at each checkpoint")
    prune_points: tuple[int, ...] = setting(DEFAULT_PRUNE_POINTS, "blocks before which tokens are pruned")
    target_ratio: float = setting(0.5, "fraction of live patch tokens removed at each pruning point "
                                       "(0.5: 64->32->16->8)", ratio=True)
    train_ratios: tuple[float, ...] = setting((), "removal ratios each training image draws one of, uniformly, so "
                                                  "that one policy serves them all (it sees 1 - ratio); empty: "
                                                  "target_ratio alone. Validation stays at target_ratio",
                                           shown="none")
    reduction: str = setting("merge", "what removed tokens become: merged into the most similar kept one "
                                      "(ToMe) or dropped", choices=REDUCTIONS)
    agents: str = setting("both", "which agents act: both, or one alone (ablation)", choices=AGENT_MODES)
    protected_share: float = setting(DEFAULT_PROTECTED_SHARE, "with both agents, the fraction of each pruning "
                                     "point's kept tokens (at least one) that the attention agent keeps out of "
                                     "the similarity agent's reach")
    images_per_env: int = setting(64, "episodes one env instance carries, rollouts_per_image of each image (one "
                                      "server call moves them all)")
    rollouts_per_image: int = setting(4, "rollouts of each image in an env, side by side (divides images_per_env); "
                                         "with reward_baseline 'rollouts' each is compared with the others")
    agree_weight: float = setting(1.0, "reward for keeping the unpruned model's answer")
    prob_weight: float = setting(1.0, "reward per unit of probability of the unpruned model's answer")
    logprob_weight: float = setting(0.0, "reward per unit of log-probability of the unpruned model's answer")
    reward_baseline: str = setting("rollouts", "subtracted from the final reward, a per-image baseline independent of "
                                               "the actions: a heuristic's fidelity on the same image, 'rollouts' the "
                                               "mean fidelity of the image's other rollouts (leave-one-out), or "
                                               "'none'", choices=("none", "rollouts", *HEURISTICS))
    hidden: int = setting(DEFAULT_HIDDEN, "width of the policy networks")
    warm_start: str = setting("distinct", "the heuristic the similarity agent first imitates (policies/warm_start.py)"
                                          ": 'nms' attention NMS, 'distinct' distinctive NMS, 'similarity' greedy "
                                          "similarity; 'none': both start uniform", choices=WARM_STARTS)
    warm_start_images: int = setting(2048, "train images the warm start imitates the heuristic on")
    warm_start_steps: int = setting(400, "Adam steps (each on a batch of decisions, policies/warm_start.py) with "
                                         "which each agent imitates its heuristic")
    checkpoint_every: int = setting(10, "validate and checkpoint every this many iterations")
    seed: int = setting(0, "seed of the policies, the image streams and the warm start")
    ppo: PPOSettings = setting(PPOSettings, "PPO settings", factory=True)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("dataset", "reduction", "agents", "warm_start", "reward_baseline"):
            choices = _field(type(self), name).metadata["choices"]
            _check(getattr(self, name) in choices, f"{name} must be one of {', '.join(choices)}, "
                                                   f"got {getattr(self, name)!r}")
        _check(self.train_limit is None or self.train_limit >= 1, f"train_limit must be >= 1, got {self.train_limit}")
        for name in ("val_size", "val_limit", "images_per_env", "hidden", "warm_start_images", "warm_start_steps",
                     "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            _check(0 <= value <= MAX_SEED, f"{name} must be in [0, {MAX_SEED}], got {value}")
        _check(len(self.prune_points) >= 1 and all(isinstance(p, int) for p in self.prune_points),
               f"prune_points must be one or more integers, got {self.prune_points!r}")
        check_target_ratio(self.target_ratio)
        for ratio in self.train_ratios:
            check_target_ratio(ratio, "train_ratios")
        _check(len(set(self.train_ratios)) == len(self.train_ratios),
               f"train_ratios must be distinct, got {self.train_ratios!r}")
        _check(self.warm_start_images >= len(self.ratios_trained),
               f"warm_start_images must be at least one per training ratio ({len(self.ratios_trained)})")
        check_protected_share(self.protected_share)
        for name in ("agree_weight", "prob_weight", "logprob_weight"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.rollouts_per_image >= 1 and self.images_per_env % self.rollouts_per_image == 0,
               f"rollouts_per_image must be >= 1 and divide images_per_env = {self.images_per_env}, "
               f"got {self.rollouts_per_image}")
        _check(self.reward_baseline != "rollouts" or self.rollouts_per_image >= 2,
               "reward_baseline 'rollouts' needs rollouts_per_image >= 2")

    def settings_without_effect(self) -> dict[str, str]:
        """The settings this problem does not read, each with why: a value given for one of them would make a
        twin of the problem without it."""
        unread = {}
        if self.agents != "both":
            unread["protected_share"] = ("the attention agent protects tokens from the similarity agent with "
                                         "--agents both")
        if self.agents == "attention" and self.warm_start != "none":
            unread["warm_start"] = ("the attention agent alone imitates greedy attention (of the warm starts, 'none' "
                                    "alone changes its start)")
        if self.warm_start == "none":
            no_fit = "--warm-start none fits no warm start"
            unread.update(dict.fromkeys(("warm_start_images", "warm_start_steps"), no_fit))
        return unread

    @property
    def ratios_trained(self) -> tuple[float, ...]:
        """The removal ratios the policy is trained at: ``train_ratios``, else ``target_ratio`` alone."""
        return self.train_ratios or (self.target_ratio,)

    @property
    def baseline_heuristic(self) -> str:
        """The heuristic whose outcome the ViT server reports with each image's (the reward baseline), or
        ``"none"`` when the baseline is not a heuristic."""
        return "none" if self.reward_baseline == "rollouts" else self.reward_baseline

    @property
    def backbone_path(self) -> Path:
        """The backbone directory (``backbone`` resolved against the repository)."""
        return stored_backbone_path(self.backbone)

    def on_backbone_data(self, given: Collection[str] = ()) -> PruningProblem:
        """This problem on its backbone's data: the data set the backbone records, and the validation split it held
        out (its size and seed, where it records them), the one split ``check_fits_backbone`` accepts in full; the
        fields named in ``given`` (``dataset``, ``val_size``, ``split_seed``: the user's settings) stay as they
        are. So a backbone trained with ``backbone.py --dataset folder --val-size 200`` needs neither flag."""
        config = read_backbone_config(self.backbone_path)
        problem = self if "dataset" in given or not config.get("dataset") else dataclasses.replace(
            self, dataset=config["dataset"])
        held_out = held_out_split(config, problem.dataset)
        return dataclasses.replace(problem, **{name: value for name, value in held_out.items() if name not in given})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PruningProblem:
        """The problem :meth:`to_json` wrote; missing fields take their defaults."""
        _check_known(cls, data, "problem")
        values = dict(data)
        if "ppo" in values:
            _check_known(PPOSettings, values["ppo"], "PPO")
            values["ppo"] = PPOSettings(**values["ppo"])
        return cls(**values)

    @classmethod
    def from_checkpoint_json(cls, config: Mapping[str, Any]) -> PruningProblem:
        """The problem of a checkpoint's ``pruning_config.json`` (or its export's ``policy.json``), of any layout.

        A checkpoint records the agents' turns through ``protected_share``. One that records no share protected a
        quarter (:data:`UNRECORDED_PROTECTED_SHARE`) if it records ``rollouts_per_image`` (which came with these
        turns); one that records neither was trained under turns in which the attention agent removed tokens, so
        its pair is refused rather than evaluated under turns it never learned (one agent alone is unaffected).
        """
        if "problem" not in config:
            problem, turns_known = cls.from_legacy_json(config), False
        else:
            data = dict(config["problem"])
            if "protected_share" not in data and "rollouts_per_image" in data:
                data["protected_share"] = UNRECORDED_PROTECTED_SHARE
            problem = cls.from_json({**UNRECORDED_SETTINGS, **data})
            turns_known = "protected_share" in data
        _check(turns_known or problem.agents != "both",
               "its agents were trained under turns in which the attention agent removed tokens, so this "
               "code's turns would evaluate a pair it never learned: retrain it with train.py")
        return problem

    @classmethod
    def from_legacy_json(cls, config: Mapping[str, Any]) -> PruningProblem:
        """The problem of a checkpoint whose ``pruning_config.json`` spreads it over ``server``, ``env``,
        ``model_config`` and top-level keys (train.py's layout before the problem was one JSON object). Such
        checkpoints that name no ``reduction`` dropped tokens, none without ``warm_start`` had one, and their
        iteration's batch was counted in env steps (each carrying ``images_per_env`` images times the agents)."""
        server, env = config.get("server"), config.get("env") or {}
        _check(isinstance(server, Mapping) and {"backbone", "prune_points", "target_ratio"} <= set(server),
               "lacks server.backbone, server.prune_points or server.target_ratio")
        values = {"backbone": server["backbone"], "dataset": server.get("dataset"), "data_dir": server.get("data_dir"),
                  "train_limit": server.get("limit"), "val_size": server.get("val_size"),
                  "split_seed": server.get("split_seed"), "prune_points": server["prune_points"],
                  "target_ratio": server["target_ratio"], "reduction": server.get("reduction", "drop"),
                  **{k: env.get(k) for k in ("agents", "images_per_env", "agree_weight", "prob_weight")},
                  "hidden": (config.get("model_config") or {}).get("hidden"),
                  "warm_start": config.get("warm_start", "none"),
                  **{k: config.get(k) for k in ("val_limit", "checkpoint_every", "seed", "ppo")}}
        if "train_batch_size_per_learner" in (values["ppo"] or {}):  # counted in env steps there
            agent_steps_per_env_step = env.get("images_per_env", 8) * len(trained_policies(env.get("agents", "both")))
            values["ppo"] = {**values["ppo"], "train_batch_size_per_learner":
                             values["ppo"]["train_batch_size_per_learner"] * agent_steps_per_env_step}
        return cls.from_json({**UNRECORDED_SETTINGS, **{k: v for k, v in values.items() if v is not None}})


def _check_known(cls: type, data: Mapping[str, Any], what: str) -> None:
    """A :class:`ProblemError` naming the keys of ``data`` that are no field of the dataclass ``cls`` (``what``
    settings)."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    _check(not unknown, f"unknown {what} settings: {', '.join(unknown)}")


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


# -- command line -------------------------------------------------------------------------------------------


def flag_name(name: str) -> str:
    """The command-line flag of the problem or PPO field ``name``, or of its destination in the parsed arguments
    (``target_ratio``, ``problem.target_ratio``): ``--target-ratio``."""
    return "--" + name.rpartition(".")[2].rstrip("_").replace("_", "-")


def _boolean(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


_block_index_list = comma_separated(int, "block indices")


def block_indices(text: str) -> tuple[int, ...]:
    """The argparse ``type`` of pruning points: comma-separated block indices, e.g. ``1,3,5,7,9,11``, from 1 and
    strictly increasing, which every backbone needs (``StagedViT``): refused here, the error names the flag and
    its value; how deep a backbone is, the command checks once it has read it."""
    points = _block_index_list(text)
    if points[0] < 1 or any(a >= b for a, b in itertools.pairwise(points)):
        raise argparse.ArgumentTypeError(f"expected strictly increasing block indices from 1 (tokens are pruned "
                                          f"before those blocks), got {text!r}")
    return points


def spelled_points(points: typing.Iterable[int]) -> str:
    """Pruning points as a flag takes them (:func:`block_indices`): ``3,6,9``."""
    return ",".join(map(str, points))


def budget_key(ratio: float) -> float:
    """A removal ratio as results and policies are keyed by it: rounded to 6 decimals, so that one budget
    written or computed two ways (``0.5``, ``0.500``, ``1 / 3``) is one key."""
    return round(ratio, 6)


def removal_ratio(text: str) -> float:
    """An argparse ``type``: a fraction of tokens to remove, in (0, 1), as a :func:`budget_key`. What is no number
    is float's ``ValueError``, which :func:`cli.comma_separated` answers naming the flag's values."""
    value = float(text)
    try:
        check_target_ratio(value, "a removal ratio")
    except ProblemError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    key = budget_key(value)
    if not 0.0 < key < 1.0:
        raise argparse.ArgumentTypeError(f"a removal ratio must be in (0, 1) at the 6 decimals budgets are kept to, "
                                         f"got {text} ({key:g})")
    return key


removal_ratios = comma_separated(removal_ratio, "removal ratios")
"""An argparse ``type``: one or more comma-separated :func:`removal_ratio` values, in the order given."""

removal_ratio_sweep = comma_separated(removal_ratio, "removal ratios to sweep")
""":data:`removal_ratios` as a setting's flag takes them (``--target-ratio 0.3,0.5``: a trial each)."""


def _parser_type(annotation: Any, choices: tuple[str, ...] | None) -> typing.Callable[[str], Any]:
    """The argparse ``type`` of a field annotation: bool, ``tuple[int, ...]``, ``tuple[float, ...]``, int / float /
    ``X | None``, which take a comma-separated sweep of values, or str: one of its ``choices``, else a path
    (``--backbone``, ``--data-dir``), which :func:`cli.named_directory` refuses empty."""
    if annotation is str and not choices:
        return named_directory
    if annotation is bool:
        return _boolean
    if typing.get_origin(annotation) is tuple:
        return block_indices if typing.get_args(annotation)[0] is int else removal_ratios
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if args else annotation
    return comma_separated(kind, "numbers") if kind in (int, float) else kind


def setting_names() -> frozenset[str]:
    """The names of the problem's and PPO's settings as their flags spell them, without a trailing ``_``
    (``lambda_``: ``--lambda``)."""
    return frozenset(f.name.rstrip("_") for cls in (PruningProblem, PPOSettings) for f in dataclasses.fields(cls))


def flag_help(doc: str) -> str:
    """A field's ``doc`` as its flag's help: the other fields it names (``target_ratio``, ``images_per_env``) by
    their flags (``--target-ratio``), which is what a user of the command line types."""
    names = setting_names()
    return re.sub(r"(?<![/\w])[a-z]+(?:_[a-z]+)+(?![\w/]|\.py)",
                  lambda name: flag_name(name[0]) if name[0] in names else name[0], doc)


def _add_fields(group: argparse._ArgumentGroup, cls: type, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = (flag_help(f.metadata["shown"]) if f.metadata.get("shown")
                 else ",".join(map(str, default)) if isinstance(default, tuple)
                 else str(default).lower() if isinstance(default, bool) else default)
        choices = f.metadata["choices"]
        parse = removal_ratio_sweep if f.metadata["ratio"] else _parser_type(hints[f.name], choices)
        metavar = None if choices else "{true,false}" if hints[f.name] is bool else f.name.rstrip("_").upper()
        group.add_argument(flag_name(f.name), dest=prefix + f.name, type=parse, default=None,
                           choices=choices, metavar=metavar, help=f"{flag_help(f.metadata['doc'])} (default: {shown})")


def add_problem_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """One flag per field of :class:`PruningProblem` and :class:`PPOSettings`, their docs as help. Each defaults
    to None, "not given", so that :func:`problems_from_args` takes the field's own default and callers can tell
    a setting given from one left to its default."""
    _add_fields(parser.add_argument_group(title), PruningProblem, "problem.")
    _add_fields(parser.add_argument_group("PPO"), PPOSettings, "ppo.")


def problems_from_args(args: argparse.Namespace) -> list[PruningProblem]:
    """The problems the flags of :func:`add_problem_arguments` describe: one, or one per combination of the
    values of the number settings given several (``--target-ratio 0.3,0.5 --lr 1e-4,3e-4``: four), in the
    order given. A ``--backbone`` path is relative to the working directory and is stored relative to the
    repository when it lies inside it."""
    values = {name: value for name, value in vars(args).items()
              if name.startswith(("problem.", "ppo.")) and value is not None}  # None: the field's default
    if "problem.backbone" in values:
        values["problem.backbone"] = repository_relative(values["problem.backbone"])
    lists = {f"problem.{name}" for name, hint in typing.get_type_hints(PruningProblem).items()
             if typing.get_origin(hint) is tuple}
    swept = {name for name, value in values.items() if isinstance(value, tuple) and name not in lists}
    grid = itertools.product(*(values[name] if name in swept else (values[name],) for name in values))
    problems = []
    for combination in grid:
        chosen = dict(zip(values, combination, strict=True))
        try:
            ppo = PPOSettings(**{k.removeprefix("ppo."): v for k, v in chosen.items() if k.startswith("ppo.")})
            problems.append(PruningProblem(**{k.removeprefix("problem."): v for k, v in chosen.items()
                                              if k.startswith("problem.")}, ppo=ppo))
        except ProblemError as error:  # "seed must be ...": the flag, "--seed must be ...", on a command line
            raise ProblemError(flag_message(str(error))) from None
    return problems


def flag_message(message: str) -> str:
    """A :class:`ProblemError`'s ``message`` for a command line: the settings it names (``seed``, at its start,
    and ``train_batch_size_per_learner``) spelled as their flags (``--seed``)."""
    first, _, rest = message.partition(" ")
    return flag_help(f"{flag_name(first)} {rest}" if first in setting_names() and rest.startswith("must") else message)


def sweep_label(problem: PruningProblem, problems: list[PruningProblem]) -> str:
    """``target_ratio=0.3,lr=0.001``: the settings in which ``problem`` differs from the others of its sweep
    (``target_ratio`` alone for a single problem), to name its trial."""
    def flat(p: PruningProblem) -> dict[str, Any]:
        data = p.to_json()
        return {**{k: v for k, v in data.items() if k != "ppo"}, **data["ppo"]}

    mine, others = flat(problem), [flat(p) for p in problems]
    varied = [name for name in mine if any(other[name] != mine[name] for other in others)] or ["target_ratio"]
    return ",".join(f"{name.rstrip('_')}={mine[name]:g}" for name in varied)
