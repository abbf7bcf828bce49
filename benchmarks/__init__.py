"""Benchmark scripts, each run as ``python -m benchmarks.<name>`` (benchmarks/README.md says what each measures)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from cli import run_command


def run_from_command_line(main: Callable[[], object]) -> NoReturn:
    """A benchmark's ``__main__``: run ``main`` as the commands run (``cli.run_command``): a bad flag, path,
    checkpoint, backbone or data set ends it with one ``error:`` line and exit code 2, Ctrl-C with one line and
    code 130. An int ``main`` returns is the exit code."""
    def run() -> int:
        result = main()
        return result if isinstance(result, int) else 0

    sys.exit(run_command(run, lambda: "interrupted"))
