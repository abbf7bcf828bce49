"""Benchmark scripts, each run as ``python -m benchmarks.<name>`` (benchmarks/README.md says what each measures)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run_from_command_line(main: Callable[[], object]) -> NoReturn:
    """A benchmark's ``__main__``: run ``main``; the project's user errors (a bad flag, path, checkpoint, backbone
    or data set) end it with one ``error:`` line and exit code 2, as the commands do. An int ``main`` returns is
    the exit code."""
    from evaluate import USER_ERRORS  # the errors evaluate.py reports in one line, every module's among them

    try:
        result = main()
    except USER_ERRORS as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
