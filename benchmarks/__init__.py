"""Benchmark scripts, each run as ``python -m benchmarks.<name>`` (benchmarks/README.md says what each measures)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from cli import OneLineParser, run_command
from envs.errors import UsageError, one_line
from envs.problem import PruningProblem
from envs.vit.backbone_checkpoint import REFERENCE_POLICY
from envs.vit.data import default_data_dir
from envs.vit.staged_vit import StagedViT
from policies.checkpoints import checkpoint_directory, read_checkpoint_info
from policies.pruned_vit import policy_backbone


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A benchmark's ``--help``: its docstring as written (how to run it and what to expect), and each flag's
    default where its help does not say it already (in words or as ``%(default)s``), it has one and the flag
    takes a value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        told = "default" in (action.help or "") or action.default is None or action.nargs == 0
        return action.help if told else super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        """The help with a list or tuple default spelled as the flag takes it (``--modes eager compiled``,
        ``--prune-points 3,6,9``), not as Python prints it (``['eager', 'compiled']``, ``(3, 6, 9)``)."""
        if isinstance(action.default, list | tuple):
            action = copy.copy(action)
            action.default = spelled_default(action.default)
        return super()._expand_help(action)


def spelled_default(value: Any) -> str:
    """A flag's default as a command line gives it: a list as its values, space-separated (a flag of
    ``nargs="+"``), a tuple as comma-separated numbers (``3,6,9``)."""
    if isinstance(value, list):
        return " ".join(map(spelled_default, value))
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def benchmark_parser(doc: str | None) -> OneLineParser:
    """The argument parser of a benchmark whose module docstring is ``doc``."""
    return OneLineParser(description=doc, formatter_class=HelpFormatter)


DATA_DIR_HELP = "where the data set lives, as train.py's --data-dir (default: $MARL_PRUNING_DATA_DIR, else ./data)"
"""The help of every benchmark's ``--data-dir``: one flag, one default, as the commands have it."""


def add_data_dir_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """A benchmark's ``--data-dir``, read as the commands read theirs (``$MARL_PRUNING_DATA_DIR``, else ``./data``)."""
    parser.add_argument("--data-dir", default=default_data_dir(), help=DATA_DIR_HELP)


def add_data_and_checkpoint_arguments(parser: argparse.ArgumentParser, checkpoint_read_for: str) -> None:
    """The flags of a benchmark that measures on a policy checkpoint's backbone and problem: ``--data-dir``
    (defaulting as train.py's: ``$MARL_PRUNING_DATA_DIR``, else ``./data``) and ``--checkpoint`` (the reference
    policy by default), whose help says what the benchmark reads of it (``checkpoint_read_for``: ``its backbone
    and problem``)."""
    add_data_dir_argument(parser)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE_POLICY,
                        help=f"{checkpoint_read_for} (default: %(default)s)")


def run_from_command_line(main: Callable[[], object]) -> NoReturn:
    """A benchmark's ``__main__``: run ``main`` as the commands run (``cli.run_command``): a bad flag, path,
    checkpoint, backbone or data set ends it with one ``error:`` line and exit code 2, Ctrl-C with one line and
    code 130. An int ``main`` returns is the exit code."""
    def run() -> int:
        result = main()
        return result if isinstance(result, int) else 0

    sys.exit(run_command(run, lambda: "interrupted"))


@contextlib.contextmanager
def fitted_on(images: int) -> Iterator[None]:
    """Around a scikit-learn fit on ``images`` train images: its ValueError on too few of them, or on answers all
    of one kind (a smoke test's counts), as one error line that names the flag to raise."""
    try:
        yield
    except ValueError as error:
        raise UsageError(f"cannot fit on {images} train images ({one_line(error)}): pass more "
                         f"--train-images") from None


def write_json(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    """``result`` as JSON at ``path`` (its folder made), when a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def checkpoint_backbone(checkpoint: str | os.PathLike) -> tuple[PruningProblem, StagedViT, dict[str, Any]]:
    """A policy checkpoint's problem and the backbone it names, split at its pruning points, with its config: what
    each benchmark measures on."""
    checkpoint = checkpoint_directory(checkpoint)  # its export folder given itself too
    problem = read_checkpoint_info(checkpoint).problem
    staged, config, _ = policy_backbone(problem, checkpoint)
    return problem, staged, config
