"""Files replaced in one step, so that a reader (or a crash) never sees half of one; interrupts held back
while several files are moved into place together; and the directories a failed command made, found so that it
can remove them again."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A staging path beside ``path`` to write to; when the block ends without an error, the staged file
    replaces ``path`` in one ``os.replace`` (atomic on one file system). After an error ``path`` is unchanged
    and the staged file is removed."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, path)


def first_missing(path: str | os.PathLike) -> Path | None:
    """The highest of ``path`` and its parents that does not exist yet: the first directory that making ``path``
    (with its parents) creates, so that removing it undoes the making; None where ``path`` exists."""
    path = Path(path)
    return next((directory for directory in reversed((path, *path.parents)) if not directory.exists()), None)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block ends, then delivered to the handlers they had (an ignored one
    stays ignored): for the few file moves that must happen all together or not at all. Outside the main
    thread, where Python runs no signal handler, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {number: signal.signal(number, lambda signum, frame: received.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)
