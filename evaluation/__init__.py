"""What ``evaluate.py`` runs: its rows (``methods``), their answers and cost on the evaluated images
(``predictions``), the comparison of learned rows with the best heuristic (``compare``), their timings
(``speed``), the whole table measured (``measure``) and its columns and files (``results_table``).
``evaluate.py`` itself reads the command line, loads the checkpoints and images, and hands them to
:func:`evaluation.measure.evaluate_methods`."""

from envs.errors import UsageError


class EvaluationError(UsageError):
    """A bad argument, checkpoint or combination of them; the message is meant for the user as is. A
    :class:`UsageError`, as every bad argument is."""
