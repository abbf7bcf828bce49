"""Files replaced in one step: a reader (or a crash) never sees half of one."""

from __future__ import annotations

import os
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
