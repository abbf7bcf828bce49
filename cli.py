"""The argument parser of the three commands (backbone.py, train.py, evaluate.py): argument errors become one
``error: ...`` line, like every other error of the commands."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A bad command line; the commands print it as one ``error: ...`` line and exit with code 2."""


class OneLineParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing the usage text and exiting, so that argument errors
    read like every other error of the commands."""

    def error(self, message: str):
        raise UsageError(message)


def add_download_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-download``: CIFAR-10/100 are fetched into the data directory when absent, unless this is given."""
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download cifar10/cifar100 (by default they are fetched into --data-dir, "
                             "with a progress bar, when absent)")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value
