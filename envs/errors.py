"""The base of the errors a user's input causes: a bad flag, path, checkpoint, backbone or data set.

Each module raises its own kind (``DataError``, ``CheckpointError``, ...), all of them a :class:`UserError`, so
that every command and benchmark reports them alike, in one ``error: ...`` line with exit code 2
(``cli.run_command``), the message folded onto that line by :func:`one_line`.
"""


class UserError(Exception):
    """Input that cannot be used; the message is meant for the user as is."""


class UsageError(UserError, ValueError):
    """A setting the code cannot use: a bad flag, argument or model, or a combination of them that does not go
    together. It is also a ``ValueError``, which a Python caller passing a bad argument expects. A plain
    ``ValueError`` is left for what only a bug causes (shapes that disagree inside a forward, say), so that it
    keeps its traceback."""


def one_line(message: object) -> str:
    """``str(message)`` with its line breaks and runs of white space folded into single spaces: an error or a
    warning, from the project or a library, as the one line that the commands print of it."""
    return " ".join(str(message).split())
