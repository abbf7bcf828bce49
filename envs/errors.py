"""The base of the errors a user's input causes: a bad flag, path, checkpoint, backbone or data set.

Each module raises its own kind (``DataError``, ``CheckpointError``, ...), all of them a :class:`UserError`, so
that every command and benchmark reports them alike, in one ``error: ...`` line with exit code 2
(``cli.run_command``).
"""


class UserError(Exception):
    """Input that cannot be used; the message is meant for the user as is."""


class UsageError(UserError, ValueError):
    """A setting the code cannot use: a bad flag, argument or model, or a combination of them that does not go
    together. It is also a ``ValueError``, which a Python caller passing a bad argument expects. A plain
    ``ValueError`` is left for what only a bug causes (shapes that disagree inside a forward, say), so that it
    keeps its traceback."""


def user_error_within(error: BaseException) -> UserError | None:
    """The :class:`UserError` that ``error`` was raised while handling, if any: Ray Tune reports an exception
    raised in one of its callbacks as a ``TuneError`` holding the traceback, with the original as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
