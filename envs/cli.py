"""The argument parser of the three commands (backbone.py, train.py, evaluate.py)."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A bad command line; the commands print it as one ``error: ...`` line and exit with code 2."""


class OneLineParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing the usage text and exiting, so that argument errors
    read like every other error of the commands."""

    def error(self, message: str):
        raise UsageError(message)
