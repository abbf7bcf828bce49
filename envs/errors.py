"""The base of the errors a user's input causes: a bad flag, path, checkpoint, backbone or data set.

Each module raises its own kind (``DataError``, ``CheckpointError``, ...), all of them a :class:`UserError`, so
that every command and benchmark reports them alike, in one ``error: ...`` line with exit code 2
(``cli.run_command``).
"""


class UserError(Exception):
    """Input that cannot be used; the message is meant for the user as is."""
