"""How the commands and the benchmarks end (``cli.run_command``): bad input in one line with exit code 2, Ctrl-C
in one line with 130, a bug with its traceback."""

from __future__ import annotations

import pytest

import evaluate
from benchmarks import run_from_command_line, saliency_headroom
from cli import run_command
from envs.vit.data import DataError


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_data() -> int:
        raise DataError("cannot read\n  the file x.png")

    assert run_command(bad_data, lambda: "interrupted") == 2
    assert capsys.readouterr().err == "error: cannot read the file x.png\n"

    def bug() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_command(bug, lambda: "interrupted")


def test_ctrl_c_during_evaluation_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run", interrupt)
    assert evaluate.main([]) == 130
    assert capsys.readouterr().err == "interrupted: nothing was written; run the command again\n"


def test_a_benchmarks_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_from_command_line(lambda: saliency_headroom.main(["--val-images", "x"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: argument --val-images: expected an integer, got 'x'\n"
