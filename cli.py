"""What the three commands (backbone.py, train.py, evaluate.py) and the benchmarks share: how they run and
report errors (:func:`run_command`), their argument parser, whose errors become one ``error: ...`` line like
every other error of the commands, and their common arguments."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tqdm import tqdm

from envs.errors import UsageError, UserError, one_line
from envs.vit.backbone_checkpoint import REPO_ROOT, installed_without_repository
from envs.vit.data import DEFAULT_MEMORY_BUDGET_MB

DISTRIBUTION = "marl-token-pruning"
"""This project's distribution name (pyproject.toml)."""
VERSIONED_PACKAGES = (DISTRIBUTION, "torch", "timm", "ray", "numpy", "scipy", "scikit-learn")
"""The packages whose versions :func:`versions_line` records with every result: those that compute its numbers.
scipy draws the paired bootstrap intervals (``evaluation.compare.paired_difference``: a seeded ``rng`` repeats
only on the scipy that drew it) and scikit-learn computes the macro F1, so a table that names neither cannot
say which interval code made it."""


def run_command(body: Callable[[], int], interrupted_line: Callable[[], str]) -> int:
    """Run a command's ``body`` and return its exit code: a user error (``envs.errors.UserError``) ends it with
    one ``error: ...`` line and code 2; Ctrl-C, or a SIGTERM (``kill``, a job scheduler), with the line
    ``interrupted_line()`` says (how to go on), or the ``KeyboardInterrupt``'s own where it carries one, and code
    130, as a shell reports a process ended by SIGINT, once the compile jobs queued behind the interrupt are
    dropped (:func:`cancel_queued_compiles`). Other exceptions, a plain ``ValueError`` included, are bugs and
    keep their tracebacks. A Python warning is one ``warning: ...`` line (:func:`one_line_warning`). An interrupt
    that Python drops is delivered again (:func:`dropped_interrupts_delivered_again`)."""
    def interrupt(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    with (signal_handlers_restored((signal.SIGTERM,)) as main_thread, warnings.catch_warnings(),
          dropped_interrupts_delivered_again()):
        warnings.showwarning = one_line_warning
        if main_thread:
            signal.signal(signal.SIGTERM, interrupt)
        try:
            return body()
        except UserError as error:
            print("error: " + one_line(error), file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:  # one raised with a line of its own says what was done
            cancel_queued_compiles()
            print(interrupt.args[0] if interrupt.args else interrupted_line(), file=sys.stderr)
            return 130


def run_command_line(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None,
                     body: Callable[[argparse.Namespace, frozenset[str]], int],
                     interrupted_line: Callable[[argparse.Namespace | None, frozenset[str]], str]) -> int:
    """:func:`run_command` for a command line ``argv`` (``sys.argv`` when None) of the parser ``build_parser``
    makes: ``body`` runs on its arguments and the flags it named (:func:`given_flags`), and ``interrupted_line``
    says from them how to go on, from (None, no flags) where the interrupt came before they parsed."""
    parsed: tuple[argparse.Namespace | None, frozenset[str]] = (None, frozenset())

    def run() -> int:
        nonlocal parsed
        parser = build_parser()
        args = parser.parse_args(argv)
        parsed = args, given_flags(parser, argv)
        return body(args, parsed[1])

    return run_command(run, lambda: interrupted_line(*parsed))


REDELIVERY_DELAY_S = 0.05
"""How long after Python dropped an interrupt it is delivered again: time for the main thread to leave the
callback it was dropped in."""


@contextlib.contextmanager
def dropped_interrupts_delivered_again() -> Iterator[None]:
    """Deliver again, as a SIGTERM to the main thread, a Ctrl-C or SIGTERM whose ``KeyboardInterrupt`` Python
    dropped. A signal's handler runs in whatever Python code the main thread runs next; where that is a weakref
    callback or a ``__del__`` (Tune's set-up runs one of an ABC cache's), the exception is unraisable: Python
    reports it to ``sys.unraisablehook`` and carries on, so that train.py, interrupted between Ray's start and
    Tune's own handler, would train to its end and exit 0. The signal is SIGTERM, whose handler
    :func:`run_command` (then train.py) sets, as SIGINT may be ignored; it goes from a timer thread, once the main
    thread has left the callback (sent from the hook, it would be raised in the hook, which drops it too); dropped
    again, it is sent again. Other unraisable exceptions go to the hook there was before. Only the main thread
    sets the hook."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = sys.unraisablehook

    def deliver_again(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)
            return
        main_thread = threading.main_thread().ident  # a signal, not _thread.interrupt_main: that waits for a sleep
        timer = threading.Timer(REDELIVERY_DELAY_S, signal.pthread_kill, (main_thread, signal.SIGTERM))
        timer.daemon = True
        timer.start()

    sys.unraisablehook = deliver_again
    try:
        yield
    finally:
        sys.unraisablehook = previous


def cancel_queued_compiles() -> None:
    """Cancel the jobs that torch.compile's inductor queued on its thread pool (a C++ or Triton build each) and
    has not started, where it compiled in this process (``--compile``): at exit Python runs every queued job of a
    thread pool before it ends, so a SIGTERM or Ctrl-C during compiling would end the process one or two minutes
    later. The jobs running finish; inductor's compile worker processes end with its own exit hook. The pool is
    forgotten, so that a later compile in this process makes a new one. Inductor's pool is not public API: where
    a torch version has moved it, the exit waits for the queued jobs."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    if async_compile is None:  # nothing was compiled
        return
    with contextlib.suppress(AttributeError):
        pool = async_compile.AsyncCompile.pool  # made at the first job, then cached
        if pool.cache_info().currsize:
            pool().shutdown(wait=False, cancel_futures=True)
            pool.cache_clear()


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the commands: the message as one ``warning: ...`` line on stderr, like their
    errors, without the file, line and source that Python's format adds for a programmer. A library's warning
    names the library and its category (``warning from torch (UserWarning): ...``), so that it is not taken
    for the project's and can be looked up or filtered."""
    source = warning_library(filename)
    prefix = "warning: " if source is None else f"warning from {source} ({category.__name__}): "
    print(prefix + one_line(message), file=sys.stderr)


@contextlib.contextmanager
def library_log_quieted(name: str) -> Iterator[None]:
    """Raise library logger ``name`` to ERROR for the duration: for a library's log line that says nothing to
    our users and would print outside the commands' ``warning: ...`` lines (RLlib's deprecation notice about
    its own legacy classes, timm's note that a one-step cosine schedule has no effect)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def warning_library(filename: str) -> str | None:
    """The top-level module of another distribution, or of the standard library, that ``filename`` belongs to
    (``torch`` for ``.../site-packages/torch/nn/functional.py``, ``multiprocessing`` for the standard library's
    ``multiprocessing/resource_tracker.py``, ``importlib`` for ``<frozen importlib._bootstrap>``, ``<string>`` as
    it is); None for this project's files, in a clone or installed. A warning is filed under the file its
    ``stacklevel`` points to, so a library's warning about how the project calls it reads as the project's."""
    if filename.startswith("<frozen "):
        return filename.removeprefix("<frozen ").split(".")[0].rstrip(">")
    if filename.startswith("<"):  # code without a file: <string>, <stdin>
        return filename
    path = Path(filename).resolve()
    installed = [i for i, part in enumerate(path.parts) if part in ("site-packages", "dist-packages")]
    if installed and installed[-1] + 1 < len(path.parts):
        top_level = Path(path.parts[installed[-1] + 1]).name.split(".")[0]
        return None if top_level in project_modules() else top_level
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    if path.is_relative_to(stdlib):
        return Path(path.relative_to(stdlib).parts[0]).name.split(".")[0]
    return None if path.is_relative_to(REPO_ROOT) else path.stem


@functools.cache
def project_modules() -> frozenset[str]:
    """The top-level modules this project's distribution installs (``envs``, ``train``, ...), read once: the scan
    of every installed distribution's metadata takes a third of a second."""
    return frozenset(name for name, distributions in packages_distributions().items()
                     if DISTRIBUTION in distributions)


@contextlib.contextmanager
def signal_handlers_restored(numbers: Sequence[int]) -> Iterator[bool]:
    """Give back, on leaving, the handlers the signals ``numbers`` had on entering; yields whether this is the
    main thread, the only one that may set them."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    saved = {number: signal.getsignal(number) for number in numbers}
    try:
        yield True
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int, name: str | None, unit: str,
                 leave: bool = True) -> tqdm:
    """The commands' progress bar named ``name`` on stderr (tqdm, over ``iterable`` or updated by hand), where
    stderr is a terminal: tqdm's ``disable=None``. Where it is not (a log file, a pipe) and where ``name`` is None,
    a bar that writes nothing (its ``disable`` is true): redrawn with carriage returns, a bar would fill a log
    with one line of every redraw."""
    return tqdm(iterable, total=total, desc=name, unit=unit, leave=leave, disable=None if name is not None else True)


def code_commit() -> str | None:
    """The repository's commit (``git describe --always --dirty``), which the results files, the backbone's config
    and the policy checkpoints record; None outside a clone (an install without the repository, which may sit
    inside another project's clone) or without git."""
    if installed_without_repository():
        return None
    try:
        described = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                                   capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None


def versions_line() -> str:
    """``marl-token-pruning 0.1.0, torch 2.14.1, ...``: what produced a result, printed by ``--version`` and
    written into every results file."""
    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return ", ".join([*(f"{package} {installed(package)}" for package in VERSIONED_PACKAGES),
                      f"python {platform.python_version()}"])


class OneLineParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing the usage text and exiting, so that argument errors
    read like every other error of the commands; every command answers ``--version``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action=_PrintVersions, help="print the versions of the packages used and exit")

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _PrintVersions(argparse.Action):
    """``--version``: :func:`versions_line` as one line (argparse's own action wraps it to the terminal)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(versions_line())
        parser.exit()


def add_data_access_arguments(parser: argparse.ArgumentParser) -> None:
    """How the commands reach the data: ``--no-download`` (CIFAR-10/100 are fetched into the data directory
    when absent, unless given) and ``--memory-budget-mb`` (larger splits are read from their files)."""
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download cifar10/cifar100 (by default they are fetched into --data-dir, "
                             "with a progress bar, when absent)")
    parser.add_argument("--memory-budget-mb", type=non_negative_float, default=None, metavar="MB",
                        help="a split that would take more than this decoded is streamed from its files instead "
                             f"of decoded into memory (default: {DEFAULT_MEMORY_BUDGET_MB:g}; 0 always streams)")


def data_access(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``envs.vit.data.load_split`` that :func:`add_data_access_arguments` set."""
    return {"download": args.download, "memory_budget_mb": args.memory_budget_mb}


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> frozenset[str]:
    """The destinations of the flags the command line ``argv`` names (``sys.argv`` when None), whatever their
    values, a default value included: argparse sets a default only where the namespace it parses into lacks the
    attribute, so parsed into a namespace of placeholders, the flags named are those whose placeholder was
    replaced. ``argv`` must already have parsed without an error."""
    placeholder = object()
    unset = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), placeholder))
    return frozenset(flag for flag, value in vars(parser.parse_args(argv, unset)).items() if value is not placeholder)


def script_words(script: str) -> list[str]:
    """``python SCRIPT`` as a command run in the current directory says it, so that a printed command runs where
    it was printed: the repository's ``SCRIPT`` relative to it within the repository or above it (``train.py``,
    ``../train.py``, ``marl/train.py``), else its absolute path."""
    path, here = REPO_ROOT / script, Path.cwd()
    related = here.is_relative_to(REPO_ROOT) or REPO_ROOT.is_relative_to(here)
    return ["python", os.path.relpath(path) if related else str(path)]


def resume_command(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                   carried: Iterable[str]) -> str:
    """The command that goes on with the interrupted run of ``script`` in ``args.output_dir``: ``--resume`` with
    the flags ``carried`` (destinations of ``parser``: those a resumed run reads from its own command line, not
    from its record) as ``args`` has them."""
    words = [word for dest in carried for word in command_words(parser, dest, getattr(args, dest))[1]]
    return shlex.join([*script_words(script), "--output-dir", args.output_dir, "--resume", *words])


def already_holds_a_run(output_dir: str | os.PathLike, otherwise: str = "--overwrite to replace it") -> str:
    """Why backbone.py and train.py refuse to start a new run in ``output_dir``: it holds a run, which ``--resume``
    goes on with; or ``otherwise``."""
    return f"{output_dir} already holds a run; pass --resume to continue it or {otherwise}"


def resume_conflict(new_run: str) -> str:
    """Why backbone.py and train.py refuse ``--resume`` given with a flag that starts a new run (``new_run``: the
    flag and what it does, ``--overwrite replaces it``)."""
    return f"--resume continues a run; {new_run}: pass one of them"


def interrupted_go_on_line(go_on_command: str, also_stopped: str = "") -> str:
    """The line an interrupted run of backbone.py or train.py ends with (:func:`run_command`'s ``interrupted_line``,
    train.py's closing lines after Tune stopped on the interrupt, or its exit once Ray's processes were stopped
    too): ``go_on_command``, from :func:`resume_command`, is how to go on; ``also_stopped``, where given, says
    what the interrupt stopped besides the run."""
    return f"interrupted{', ' + also_stopped if also_stopped else ''}: go on with {go_on_command}"


def command_words(parser: argparse.ArgumentParser, dest: str, value: Any) -> tuple[str, list[str]]:
    """How a command line of ``parser`` sets ``dest`` (an argparse destination) to ``value``, as (its option, the
    words): the switch that sets it (``--half``, ``--no-download``, ``--no-amp``), the option and its value
    (``--lr 0.001``), or no words where leaving the option out does (an unset ``--pretrained``, no ``--limit``)."""
    actions = [action for action in parser._actions if action.dest == dest]
    for action in actions:
        if isinstance(action, argparse.BooleanOptionalAction):
            option = action.option_strings[0 if value else 1]
            return option, [option]
        if action.nargs == 0 and action.const == value:
            return action.option_strings[0], [action.option_strings[0]]
    option = actions[0].option_strings[0]
    if actions[0].nargs == 0 or value is None or value == []:
        return option, []
    return option, [option, *map(command_value, value if isinstance(value, list) else [value])]


def command_value(value: Any) -> str:
    """``value`` as a user writes it on a command line: a whole float without its ``.0`` (``--time-budget 0``,
    ``--memory-budget-mb 512``, not the ``0.0`` that ``str`` gives and no one types), any other float as the
    shortest text that reads back as it (``1.5``, ``0.0001``, ``1e+16``), anything else as ``str`` has it. The
    command reads the same value back: the float flags' types take integers too."""
    return repr(value).removesuffix(".0") if isinstance(value, float) else str(value)


def check_output_dir(path: Path, given: str) -> None:
    """A :class:`UsageError` naming what keeps ``--output-dir given`` (``path``, resolved or not) from being
    written, before anything is read or started: a file at ``path`` or above it, or a directory this process
    may not write in (its permissions, a read-only disk). A directory is made in it and removed again, since
    ``os.access`` does not see every refusal: a file system that holds no directories of one's own (sysfs), NFS's
    root squash, a security module; where it does not, the commands' own ``mkdir`` would end in a traceback."""
    blocking = next((part for part in (path, *path.parents) if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--output-dir {given}: {blocking} is a file, not a directory")
    existing = next(part for part in (path, *path.parents) if part.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {given}: {existing} is not writable (its permissions, or a read-only disk)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        raise UsageError(f"--output-dir {given}: {existing} is not writable ({error.strerror or error})") from None


def output_directory(text: str) -> str:
    """An argparse ``type`` for ``--output-dir``: not empty (``--output-dir=$OUT`` with ``OUT`` unset would write
    into the current directory), ``~`` expanded; a cloud URI (``s3://...``) stays as it is."""
    return named_directory(text)


def named_directory(text: str) -> str:
    """An argparse ``type`` for a directory to read or write: not empty, ``~`` expanded (:func:`home_expanded`).
    ``--data-dir=$DATA`` with ``DATA`` unset would name the current directory, into which the commands download
    CIFAR-10 when online, and an empty ``--backbone`` no backbone, taken for the default without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name a directory (an unset shell variable?)")
    return home_expanded(text)


def home_expanded(text: str) -> str:
    """An argparse ``type`` for a path: ``~`` expanded, which the shell does for ``--flag ~/x`` but not for
    ``--flag=~/x``; otherwise the text as given (a cloud URI's ``//`` too)."""
    return os.path.expanduser(text)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _int_at_least(text, 0)


MAX_SEED = 2**32 - 1
"""The largest seed every generator the commands seed takes (numpy's global one, which timm's mixup draws from,
takes no more)."""


def random_seed(text: str) -> int:
    """An argparse ``type``: a seed, an integer in [0, :data:`MAX_SEED`]."""
    value = _int_at_least(text, 0)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED}, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a learning rate, a temperature, a duration to measure over)."""
    return _finite_float(text, positive=True)


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _finite_float(text, positive=False)


def _finite_float(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ((value > 0 if positive else value >= 0) and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if positive else '>='} 0, got {text}")
    return value


Item = TypeVar("Item")


def comma_separated(item: Callable[[str], Item], what: str) -> Callable[[str], tuple[Item, ...]]:
    """An argparse ``type`` for one or more comma-separated values, each read by ``item`` (another argparse
    ``type``), in the order given; ``what`` names the values in its messages (``block indices``). An empty value
    (``3,,6``, a comma at either end, an empty string) is refused rather than skipped: it is a typo or a value left
    out. A value that ``item`` answers with a ``ValueError`` (``int("a")``) is refused with a message naming
    ``what``; an ``ArgumentTypeError`` of ``item``'s own (a value out of range) keeps its message, followed by the
    whole text where it holds several values, since the value it names is only a part of what was typed. Two
    values that read as one with a decimal point (``0,5``: 0 and 5, where 0.5 was meant) get a hint that ','
    separates values and '.' is the decimal point."""
    def parse(text: str) -> tuple[Item, ...]:
        values = [value.strip() for value in text.split(",")]
        if "" in values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} with none empty, got {text!r}")
        try:
            return tuple(map(item, values))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        except argparse.ArgumentTypeError as error:
            if len(values) == 1:
                raise
            hint = (f": ',' separates {what} and '.' is the decimal point, as in {'.'.join(values)}"
                    if len(values) == 2 and _reads(item, ".".join(values)) else "")
            raise argparse.ArgumentTypeError(f"{error} (of {text!r}{hint})") from None

    return parse


def _reads(item: Callable[[str], Any], text: str) -> bool:
    """Whether the argparse ``type`` ``item`` takes ``text``."""
    try:
        item(text)
    except (ValueError, argparse.ArgumentTypeError):
        return False
    return True


DURATION_UNITS = {"s": (1.0, "seconds"), "m": (60.0, "minutes"), "min": (60.0, "minutes"), "h": (3600.0, "hours")}
"""The units a duration flag takes after its number (any case), each as (seconds, name): ``90s``, ``20m``,
``20 min``, ``1.5h``."""


def duration_in(unit: str) -> Callable[[str], float]:
    """An argparse ``type`` for a duration counted in ``unit`` (a key of :data:`DURATION_UNITS`): a bare number is
    in that unit (train.py counts minutes, backbone.py seconds), a number with a unit is converted to it, so that
    ``--time-budget 90s`` means the same to both commands. Finite and >= 0 once converted."""
    def duration(text: str) -> float:
        given = re.fullmatch(rf"\s*(\S*?)\s*({'|'.join(DURATION_UNITS)})?\s*", text, flags=re.IGNORECASE)
        number, suffix = given.groups() if given else ("", None)
        try:
            value = float(number) * (DURATION_UNITS[suffix.lower()][0] / DURATION_UNITS[unit][0] if suffix else 1.0)
        except ValueError:
            value = math.nan
        if not 0 <= value < math.inf:
            raise argparse.ArgumentTypeError(f"expected a duration >= 0 in {DURATION_UNITS[unit][1]} or with a unit "
                                             f"(90s, 20m, 1.5h), got {text!r}")
        return value

    return duration


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value
