"""How the commands and the benchmarks end (``cli.run_command``): bad input in one line with exit code 2, Ctrl-C
in one line with 130, a bug with its traceback."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import multiprocessing.resource_tracker
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import LogisticRegression

import cli
import evaluate
from benchmarks import fitted_on, run_from_command_line
from cli import duration_in, run_command, warning_library
from envs.errors import UsageError
from envs.vit.data import DataError
from training.ray_session import start_ray


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_data() -> int:
        raise DataError("cannot read\n  the file x.png")

    assert run_command(bad_data, lambda: "interrupted") == 2
    assert capsys.readouterr().err == "error: cannot read the file x.png\n"

    def bug() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_command(bug, lambda: "interrupted")

    def bad_argument() -> int:  # the checks of arguments raise UsageError, also a ValueError for Python callers
        raise UsageError("prune_points must be strictly increasing")

    assert run_command(bad_argument, lambda: "interrupted") == 2
    assert capsys.readouterr().err == "error: prune_points must be strictly increasing\n"

    def bug_raising_value_error() -> int:  # only a bug raises a plain ValueError: its traceback stays
        raise ValueError("operands could not be broadcast together")

    with pytest.raises(ValueError, match="broadcast"):
        run_command(bug_raising_value_error, lambda: "interrupted")


def test_a_warning_is_one_line_and_python_prints_its_own_again_afterwards(capsys):
    def warns() -> int:
        warnings.warn("a checkpoint\n  without export", stacklevel=1)
        return 0

    showwarning = warnings.showwarning
    assert run_command(warns, lambda: "interrupted") == 0
    assert capsys.readouterr().err == "warning: a checkpoint without export\n"  # no file, line or source
    assert warnings.showwarning is showwarning


def test_a_librarys_warning_names_the_library_and_its_category(capsys, tmp_path):
    def library_warns() -> int:  # as torch's code would warn
        warnings.warn_explicit("TypedStorage is deprecated", UserWarning, torch.__file__, 1)
        return 0

    assert run_command(library_warns, lambda: "interrupted") == 0
    assert capsys.readouterr().err == "warning from torch (UserWarning): TypedStorage is deprecated\n"
    assert warning_library(warnings.__file__) == "warnings"  # the standard library's
    assert warning_library(multiprocessing.resource_tracker.__file__) == "multiprocessing"  # by its top-level module
    assert warning_library("<frozen importlib._bootstrap>") == "importlib"
    assert warning_library("<string>") == "<string>"  # code without a file: not the project's either
    assert warning_library(cli.__file__) is None  # the project's, in a clone
    installed = tmp_path / "lib" / "python3.12" / "site-packages" / "envs" / "vit" / "pruned_vit.py"
    assert warning_library(str(installed)) is None  # the project's, installed


def test_ctrl_c_during_evaluation_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupt(args, given):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run", interrupt)
    assert evaluate.main([]) == 130
    assert capsys.readouterr().err == "interrupted: nothing was written; run the command again\n"


def test_an_interrupt_python_drops_in_a_weakref_callback_is_delivered_again(capsys):
    """A Ctrl-C or SIGTERM whose handler runs in a weakref callback raises a KeyboardInterrupt that Python drops: it
    is delivered again, once the callback is left, and the command ends as interrupted, not as if never stopped."""
    class Resource:
        pass

    def body():
        resource = Resource()
        reference = weakref.ref(resource, lambda reference: signal.raise_signal(signal.SIGINT))
        del resource  # its callback runs the handler: the KeyboardInterrupt is raised there, and dropped
        time.sleep(5)
        return 0 if reference() is None else 1

    unraisable_hook, interrupt_handler = sys.unraisablehook, signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # earlier tests may have left another one
    try:
        assert run_command(body, lambda: "interrupted: go on") == 130
    finally:
        signal.signal(signal.SIGINT, interrupt_handler)
    assert capsys.readouterr().err == "interrupted: go on\n"
    assert sys.unraisablehook is unraisable_hook


def test_an_interrupt_drops_the_compile_jobs_queued(monkeypatch, capsys):
    """Ctrl-C or SIGTERM during --compile: the builds inductor queued on its thread pool are cancelled, so that
    Python's exit, which runs every queued job of a thread pool, does not build them first (one or two minutes on
    a CPU); the jobs running finish, and a later compile gets a new pool."""
    from torch._inductor import async_compile, config

    monkeypatch.setattr(config, "compile_threads", 2)  # with one, inductor builds in the caller and makes no pool
    async_compile.AsyncCompile.pool.cache_clear()
    release, built, jobs = threading.Event(), [], {}

    def compile_and_interrupt() -> int:
        pool = async_compile.AsyncCompile.pool()
        jobs["running"] = [pool.submit(release.wait) for _ in range(2)]  # both threads busy
        jobs["queued"] = [pool.submit(built.append, i) for i in range(5)]
        raise KeyboardInterrupt

    try:
        assert run_command(compile_and_interrupt, lambda: "interrupted") == 130
    finally:
        release.set()
    assert capsys.readouterr().err == "interrupted\n"
    assert all(job.result(timeout=10) for job in jobs["running"])
    assert all(job.cancelled() for job in jobs["queued"]) and built == []
    pool = async_compile.AsyncCompile.pool()
    assert pool.submit(built.append, 0).result(timeout=10) is None and built == [0]
    pool.shutdown()
    async_compile.AsyncCompile.pool.cache_clear()


@pytest.mark.parametrize(("benchmark", "flags", "message"), [
    ("saliency_headroom", ["--val-images", "x"], "argument --val-images: expected an integer, got 'x'"),
    ("content_headroom", ["--samples", "1"], "argument --samples: must be at least 2 (each draw is compared with "
                                             "the others' mean), got 1"),
    ("content_headroom", ["--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0"),
    ("search_distil", ["--temperature", "-1"], "argument --temperature: must be a finite number > 0, got -1"),
    ("batch1_latency", ["--images", "0"], "argument --images: must be at least 1, got 0"),
    ("batch1_latency", ["--images", "2", "--batch-size", "64"],  # timed 2-image passes, reported as batch 64
     "--images 2: a timed pass is whole batches of --batch-size 64, so --images must be a multiple of it"),
    ("engine_throughput", ["--seconds", "-1"], "argument --seconds: must be a finite number >= 0, got -1"),
    ("feature_headroom", ["--elite", "8", "--population", "4"],
     "--elite 8: the best of a --population of 4 cannot be more"),
    ("server_throughput", ["--callers", "1", "0"], "argument --callers: must be at least 1, got 0"),
    ("speed_at_224", ["--reg-tokens", "-1"], "argument --reg-tokens: must be at least 0, got -1"),
    ("feature_headroom", ["--seed", str(2**64)], f"argument --seed: must be at most 4294967295, got {2**64}"),
    ("learned_vs_warm_start", ["/nowhere"], "/nowhere does not exist: pass a trial directory of train.py "
                                            "(<output-dir>/target_ratio=0.5)"),
    # train.py's flags after --: checked before Ray starts, and refused where the benchmark sets its own after them
    ("train_throughput", ["--", "--num-workers", "-1"], "argument --num-workers: must be at least 0, got -1"),
    ("train_throughput", ["--", "--num-workers", "1", "--output-dir", "mine", "--iterations", "9"],
     "--iterations, --output-dir after --: the benchmark sets them itself (a new run of its own --iterations, "
     "given before --, with no warm start, validated once at the stop, in a temporary directory it removes)"),
    ("train_throughput", ["--", "--from-checkpoint", "runs/marl/trial/checkpoint_000004"],
     "--from-checkpoint after --: the benchmark sets it itself (a new run of its own --iterations, given before --, "
     "with no warm start, validated once at the stop, in a temporary directory it removes)"),
    ("train_throughput", ["--", "--data-dir", "elsewhere"], "--data-dir is given before and after --: give it once"),
    ("train_throughput", ["--", "--warm-start-steps", "100"],
     "--warm-start-steps after --: the benchmark sets it itself (a new run of its own --iterations, given before --, "
     "with no warm start, validated once at the stop, in a temporary directory it removes)"),
])
def test_a_benchmarks_bad_flag_is_one_line(benchmark, flags, message, capsys):
    """Refused before anything runs: a count of 0 or a temperature of 0 ended in a traceback, or in a table of
    NaN-trained numbers, after minutes."""
    module = importlib.import_module(f"benchmarks.{benchmark}")
    with pytest.raises(SystemExit) as exit_:
        run_from_command_line(lambda: module.main(["--data-dir", "no_data", *flags]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_an_install_without_the_repository_says_so(monkeypatch, tmp_path, capsys):
    """``pip install .`` puts the code in site-packages without reference/: the errors say why the reference files
    are missing and that --address cannot ship the code, instead of naming paths the user never gave."""
    import train
    from envs.vit import backbone_checkpoint

    monkeypatch.setattr(backbone_checkpoint, "REPO_ROOT", tmp_path)  # site-packages: no pyproject.toml there
    monkeypatch.setattr(evaluate, "DEFAULT_CHECKPOINT", tmp_path / "reference" / "marl_policy")
    assert evaluate.main(["--data-dir", str(tmp_path)]) == 2
    assert "the default: this is an install without the repository" in capsys.readouterr().err
    with pytest.raises(backbone_checkpoint.CheckpointError, match="install a clone with pip install -e"):
        backbone_checkpoint.read_backbone_config(tmp_path / "reference" / "vit_tiny_cifar10")
    with pytest.raises(UsageError, match="--address auto: this is an install without the repository"):
        start_ray(train.build_parser().parse_args(["--address", "auto"]), reserved_cpus=1)


def test_a_ray_client_address_nobody_answers_at_is_one_line(monkeypatch):
    """``ray://`` addresses are left to ray.init, which gives up after its retries with a ConnectionError."""
    import train
    from training import ray_session

    def unanswered(**kwargs):
        raise ConnectionError("ray client connection timeout")

    monkeypatch.setattr(ray_session.ray, "init", unanswered)
    with pytest.raises(UsageError, match="^--address ray://head:10001: ray client connection timeout$"):
        start_ray(train.build_parser().parse_args(["--address", "ray://head:10001"]), reserved_cpus=1)

    def conflicting(**kwargs):  # ray job submit --working-dir: the job's runtime_env sets a field of ours
        raise ValueError("Failed to merge the Job's runtime env because of a conflict.")

    monkeypatch.setattr(ray_session.ray, "init", conflicting)
    with pytest.raises(UsageError, match="^--address auto: Failed to merge the Job's runtime env"):
        start_ray(train.build_parser().parse_args(["--address", "auto"]), reserved_cpus=1)


def test_a_ray_job_that_sets_the_hash_seed_keeps_its_own(monkeypatch):
    """ray.init refuses an environment variable that the Ray job it runs in sets too, even with one value."""
    from training import ray_session

    monkeypatch.delenv(ray_session.RAY_JOB_CONFIG, raising=False)
    assert ray_session.worker_env_vars() == {"env_vars": ray_session.HASH_SEED}
    for job_env, ours in (({"PYTHONHASHSEED": "3"}, {}), ({"OMP_NUM_THREADS": "1"}, ray_session.HASH_SEED)):
        monkeypatch.setenv(ray_session.RAY_JOB_CONFIG, json.dumps({"runtime_env": {"env_vars": job_env}}))
        assert ray_session.worker_env_vars() == ({"env_vars": ours} if ours else {})


def test_a_duration_is_in_the_commands_unit_or_says_its_own():
    """train.py counts --time-budget in minutes, backbone.py in seconds: a unit given means the same to both."""
    minutes, seconds = duration_in("m"), duration_in("s")
    assert [minutes(text) for text in ("20", "90s", "20m", "20 min", "1.5H", " 0 ", "1e3")] == [20, 1.5, 20, 20, 90, 0,
                                                                                                 1000]
    assert [seconds(text) for text in ("540", "9m", "0.5h", "30 s")] == [540, 540, 1800, 30]
    for bad in ("-5", "inf", "nan", "1e308h", "90x", "0.5hh", "5 x", "m", ""):  # 1e308h: finite, not in minutes
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected a duration >= 0 in minutes or with a unit"):
            minutes(bad)


def test_a_printed_command_gives_numbers_as_a_user_writes_them():
    """The go-on command of train.py and backbone.py printed ``--time-budget 0.0`` for ``--time-budget 0``: each
    number is as a user writes it, and the flag reads it back as the same value."""
    import train

    parser = train.build_parser()
    for value, words in ((0.0, "0"), (18.0, "18"), (1.5, "1.5"), (1e-4, "0.0001"), (1e16, "1e+16")):
        option, spelled = cli.command_words(parser, "time_budget", value)
        assert spelled == ["--time-budget", words] and parser.parse_args(spelled).time_budget == value
    assert cli.command_words(parser, "memory_budget_mb", 512.0)[1] == ["--memory-budget-mb", "512"]
    assert cli.command_words(parser, "iterations", 7)[1] == ["--iterations", "7"]
    argv = ["--output-dir", "runs/x", "--time-budget", "0", "--memory-budget-mb", "0"]
    assert train.go_on_command(parser.parse_args(argv), cli.given_flags(parser, argv)).endswith(
        "train.py --output-dir runs/x --resume --memory-budget-mb 0 --time-budget 0")


@pytest.mark.parametrize("command", ["train", "evaluate", "backbone"])
def test_an_empty_output_dir_is_refused_not_taken_for_the_current_directory(command, capsys):
    """``--output-dir=$OUT`` with OUT unset wrote into the current directory (evaluate.py: the repository's
    root)."""
    assert importlib.import_module(command).main(["--output-dir="]) == 2
    assert capsys.readouterr().err.endswith(
        "error: argument --output-dir: empty: name a directory (an unset shell variable?)\n")
    assert cli.output_directory("~/runs") == str(Path.home() / "runs") and cli.output_directory("s3://b/r") == "s3://b/r"


@pytest.mark.parametrize(("command", "flag"), [
    ("evaluate", "--data-dir"), ("evaluate", "--checkpoint"), ("evaluate", "--backbone"),
    ("train", "--data-dir"), ("train", "--backbone"), ("backbone", "--data-dir"), ("backbone", "--init-from"),
])
def test_an_empty_directory_to_read_is_refused(command, flag, capsys):
    """``--data-dir=$DATA`` with DATA unset named the current directory, into which evaluate.py and backbone.py
    download CIFAR-10 when online; an empty --checkpoint was the current directory too, and an empty --backbone
    fell back to the default backbone without a word."""
    assert importlib.import_module(command).main([f"{flag}="]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: argument {flag}: empty: name a directory (an unset shell variable?)\n")
    assert cli.named_directory("~/data") == str(Path.home() / "data")


@pytest.mark.parametrize("command", ["train", "evaluate", "backbone"])
def test_an_output_dir_that_refuses_a_directory_where_os_access_allows_it_is_one_line(command, tmp_path, monkeypatch,
                                                                                      capsys):
    """os.access passes a directory in which making one fails all the same (sysfs's EPERM, NFS's root squash): train.py
    and backbone.py ended in their mkdir's traceback, evaluate.py after the whole evaluation."""
    refusing, mkdir = tmp_path / "refusing", os.mkdir
    refusing.mkdir()

    def refused_mkdir(path, *args, **kwargs):
        if Path(path).parent == refusing:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused_mkdir)
    assert importlib.import_module(command).main(["--output-dir", str(refusing / "out")]) == 2
    assert capsys.readouterr().err == (f"error: --output-dir {refusing / 'out'}: {refusing} is not writable "
                                       f"(Operation not permitted)\n")
    assert list(refusing.iterdir()) == []


@pytest.mark.parametrize("value", ["{0},,{1}", "{0},{1},", ",{0},{1}"])
@pytest.mark.parametrize(("command", "flag", "values", "first", "second"), [
    ("train", "--prune-points", "block indices", "3", "6"),
    ("train", "--train-ratios", "removal ratios", "0.3", "0.5"),
    ("train", "--target-ratio", "removal ratios to sweep", "0.3", "0.5"),
    ("train", "--seed", "numbers", "1", "2"),  # the parser of every other number setting (a sweep)
    ("evaluate", "--prune-points", "block indices", "3", "6"),
    ("evaluate", "--cascade-points", "block indices", "3", "6"),
    ("evaluate", "--budgets", "removal ratios", "0.3", "0.5"),
    ("evaluate", "--cascade", "removal ratios", "0.3", "0.1"),
    ("evaluate", "--speed-batch-sizes", "batch sizes", "1", "256"),
    ("evaluate", "--checkpoints-per-budget", "RATIO=PATH pairs", "0.3=runs/a", "0.7=runs/b"),
])
def test_an_empty_value_of_a_comma_separated_flag_is_refused(command, flag, values, first, second, value, capsys):
    """A comma too many is a typo or a value left out: every comma-separated flag refuses it in one line rather
    than run with the values around it."""
    given = value.format(first, second)
    assert importlib.import_module(command).main([flag, given]) == 2
    err = capsys.readouterr().err
    assert err == f"error: argument {flag}: expected comma-separated {values} with none empty, got {given!r}\n"


@pytest.mark.parametrize(("command", "flag", "given", "message"), [
    ("train", "--target-ratio", "0,5", "a removal ratio must be in (0, 1), got 0.0 (of '0,5': ',' separates removal "
                                       "ratios to sweep and '.' is the decimal point, as in 0.5)"),
    ("train", "--train-ratios", "0.3,5", "a removal ratio must be in (0, 1), got 5.0 (of '0.3,5')"),
    ("train", "--target-ratio", "1.5", "a removal ratio must be in (0, 1), got 1.5"),
    ("evaluate", "--budgets", "0,7", "a removal ratio must be in (0, 1), got 0.0 (of '0,7': ',' separates removal "
                                     "ratios and '.' is the decimal point, as in 0.7)"),
    ("evaluate", "--budgets", "1,5", "a removal ratio must be in (0, 1), got 1.0 (of '1,5')"),  # 1.5 is none either
    ("evaluate", "--speed-batch-sizes", "1,0", "must be at least 1, got 0 (of '1,0')"),  # 1.0 is no batch size
])
def test_a_value_out_of_range_in_a_comma_separated_flag_shows_the_whole_value(command, flag, given, message,
                                                                               capsys):
    """The value a parser refuses is one part of what was typed: the message shows all of it, and where the two
    parts read as one number with a decimal point (a decimal comma, ``0,5`` for a sweep of 0 and 5), says so."""
    assert importlib.import_module(command).main([flag, given]) == 2
    assert capsys.readouterr().err == f"error: argument {flag}: {message}\n"


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("given", ["0,2", "3,2", "1,1", "-1"])
def test_pruning_points_no_backbone_takes_are_refused_naming_the_flag(command, given, capsys):
    """Pruning points before block 0 or out of order were refused by StagedViT without naming --prune-points or
    the value given; no backbone takes them, so the parser refuses them."""
    assert importlib.import_module(command).main(["--prune-points", given, "--output-dir", "unused"]) == 2
    assert capsys.readouterr().err == (f"error: argument --prune-points: expected strictly increasing block indices "
                                       f"from 1 (tokens are pruned before those blocks), got {given!r}\n")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_pruning_points_past_the_backbones_blocks_name_the_flag(command, tiny_backbone, tmp_path, capsys):
    """Points beyond a backbone's last block are known once it is read: the error names --prune-points and its
    value too, before any data is read, the default's where none was given."""
    extra = ["--heuristics-only"] if command == "evaluate" else []
    for given, points in ((["--prune-points", "1,5"], "1,5"), ([], "3,6,9")):
        assert importlib.import_module(command).main(
            [*extra, *given, "--backbone", str(tiny_backbone), "--data-dir", str(tmp_path / "no_data"),
             "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --prune-points {points}: ") and err.count("\n") == 1, err
        assert "strictly increasing integers in [1, 3] for a 4-block ViT" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "backbone"])
def test_a_commands_help_says_how_to_run_it(command, capsys):
    """``--help`` prints the command's docstring whole: it opens with how to run it; each flag says what it is
    for, not only its default (evaluate.py's --batch-size and --output-dir said ``default: ...`` alone), and no
    default reads as Python's ``None`` or as nothing."""
    module = importlib.import_module(command)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and module.__doc__.split("\n\n")[1] in printed
    assert [action.dest for action in module.build_parser()._actions
            if not action.help or action.help.startswith("default")] == []
    flowing = " ".join(printed.split())
    assert "(default: None)" not in flowing and "(default: )" not in flowing


@pytest.mark.parametrize("benchmark", ["backbone_step", "batch1_latency", "budget_headroom", "cascade_headroom",
                                       "content_headroom", "engine_throughput", "feature_headroom",
                                       "learned_vs_warm_start", "saliency_headroom", "schedule_headroom",
                                       "search_distil", "server_throughput", "speed_at_224", "train_throughput"])
def test_a_benchmarks_help_says_how_to_run_it_and_each_flags_default(benchmark, capsys, monkeypatch):
    """``--help`` prints the docstring whole (it opens with the command and what to expect), what each flag is
    for, and every default once."""
    module = importlib.import_module(f"benchmarks.{benchmark}")
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *args, **kwargs: parsers.append(self) or parse_args(self, *args, **kwargs))
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert [action.dest for action in parsers[0]._actions
            if not action.help or action.help.startswith("default")] == []
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and f"python -m benchmarks.{benchmark}" in printed
    assert "--version" in printed and "(default: " in printed
    flowing = " ".join(printed.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in flowing and not re.search(r"\(default: [^()]*\)\s*\(default: ", flowing)
    assert not re.search(r"\(default: [\[(]", flowing), "a list or tuple default printed as Python's repr"


def test_a_fit_on_too_few_images_names_the_flag_to_raise():
    """The headroom benchmarks fit scikit-learn rules on their train images: at a smoke test's counts its
    ValueError (one class only, fewer samples than folds) is a user's error naming --train-images."""
    with pytest.raises(UsageError, match=r"^cannot fit on 2 train images \(This solver needs samples of at least 2 "
                                         r"classes.*\): pass more --train-images$"), fitted_on(2):
        LogisticRegression().fit([[0.0], [1.0]], [1, 1])


@pytest.mark.parametrize(("args", "message"), [
    (["bogus"], "unknown mode bogus; usage: bash benchmarks/gpu_session.sh"),
    (["backbone"], "usage: bash benchmarks/gpu_session.sh"),  # no SECONDS
])
def test_the_gpu_session_script_checks_its_arguments_before_it_starts(args, message, tmp_path):
    """Device time is short: a wrong mode or a missing argument ends the script at once, writing nothing."""
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", args[0], str(tmp_path / "out"), *args[1:]],
                          cwd=cli.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stdout == ""
    assert not (tmp_path / "out").exists()


def test_the_versions_every_result_records_name_the_packages_that_compute_its_intervals_and_f1():
    """A results file's ``versions`` must name scipy (the seeded paired bootstrap) and scikit-learn (macro F1):
    another version of either may read other digits from the same predictions."""
    line = cli.versions_line()
    for package in ("scipy", "scikit-learn", "torch", "numpy"):
        assert f"{package} {version(package)}" in line.split(", ")
