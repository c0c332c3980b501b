"""The error boundary every command runs inside (utils.errors.run_command): exit codes, one
``error:`` line for what a user can fix, tracebacks only for bugs or with --debug."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from helpers import REPO
from utils.errors import (
    DEBUG_ENV,
    EXIT_BUG,
    EXIT_CHECKPOINT,
    EXIT_DATA,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_SYSTEM,
    EXIT_USAGE,
    CheckpointError,
    DataError,
    UserError,
    run_command,
)
from utils.schema import ConfigError


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE", DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)


def raising(exc: BaseException):
    """A CLI main that records its argv and raises ``exc``."""
    seen: list[list[str] | None] = []

    def main(argv: list[str] | None = None) -> int:
        seen.append(argv)
        raise exc

    main.seen = seen  # type: ignore[attr-defined]
    return main


class Diverged(RuntimeError):
    exit_code = EXIT_DIVERGED


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (UserError("--top-p must be in (0, 1]"), EXIT_USAGE, "--top-p must be in (0, 1]"),
        (ConfigError([("train.niter", "must be >= 1")], "x.yml"), EXIT_USAGE, "train.niter"),
        (DataError("corpus.tsv: no items"), EXIT_DATA, "corpus.tsv: no items"),
        (CheckpointError("5.state is corrupt"), EXIT_CHECKPOINT, "5.state is corrupt"),
        (Diverged("stopping: 3 steps in a row"), EXIT_DIVERGED, "stopping: 3 steps"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
        (
            FileNotFoundError("checkpoint /x/1.state does not exist"),
            EXIT_USAGE,
            "checkpoint /x/1.state does not exist",
        ),
        (MemoryError(), EXIT_SYSTEM, "out of CPU memory"),
    ],
)
def test_user_errors_print_one_line_and_their_exit_code(exc, code, message, capsys):
    assert run_command(raising(exc), ["-opt", "x.yml"]) == code
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and out == ""


def test_os_errors_from_the_system_are_readable_and_exit_6(capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/models/5_gen.safetensors")
    assert run_command(raising(full), []) == EXIT_SYSTEM
    err = capsys.readouterr().err
    assert err.startswith("error: /runs/x/models/5_gen.safetensors: No space left on device")
    assert "the disk is full" in err and "Traceback" not in err
    for code, advice in [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")]:
        assert run_command(raising(OSError(code, "refused", "/ro/out.wav")), []) == EXIT_SYSTEM
        err = capsys.readouterr().err
        assert "/ro/out.wav" in err and advice in err and "Traceback" not in err


def test_bugs_print_the_traceback_and_exit_1(capsys):
    assert run_command(raising(ZeroDivisionError("division by zero")), []) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "looks like a bug" in err
    # an OSError no user can act on is a bug too
    assert run_command(raising(OSError(errno.EBADF, "Bad file descriptor")), []) == EXIT_BUG
    assert "Traceback" in capsys.readouterr().err


def test_debug_flag_shows_the_traceback_and_is_removed(capsys):
    main = raising(UserError("bad option"))
    assert run_command(main, ["-opt", "x.yml", "--debug"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError: bad option" in err
    assert err.rstrip().endswith("error: bad option")
    assert main.seen == [["-opt", "x.yml"]]  # main never sees --debug


def test_debug_environment_variable(monkeypatch, capsys):
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_command(raising(DataError("bad wav")), []) == EXIT_DATA
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert run_command(raising(DataError("bad wav")), []) == EXIT_DATA
    assert "Traceback" not in capsys.readouterr().err


def test_shared_errors_print_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_command(raising(ConfigError([("train.niter", "bad")])), []) == EXIT_USAGE
    assert capsys.readouterr().err == ""  # rank 0 says it, once
    assert run_command(raising(CheckpointError("gone")), []) == EXIT_CHECKPOINT
    assert capsys.readouterr().err == ""
    # what one rank meets alone (its data, its disk) is printed there, with the rank
    assert run_command(raising(DataError("u7.wav: unreadable")), []) == EXIT_DATA
    assert capsys.readouterr().err == "[rank 1] error: u7.wav: unreadable\n"
    assert run_command(raising(OSError(errno.ENOSPC, "No space left", "/x")), []) == EXIT_SYSTEM
    assert capsys.readouterr().err.startswith("[rank 1] error: /x: No space left")
    monkeypatch.setenv("RANK", "0")
    assert run_command(raising(ConfigError([("train.niter", "bad")])), []) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: 1 problem:")


def test_exit_codes_of_system_exit_and_success(capsys):
    def usage(argv):
        raise SystemExit(2)

    assert run_command(usage, []) == 2
    assert run_command(lambda argv: None, []) == 0
    assert run_command(lambda argv: 4, []) == 4

    def message(argv):
        raise SystemExit("stopped")

    assert run_command(message, []) == EXIT_BUG and "stopped" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_command_exits_with_the_code(tmp_path):
    """The exit status a shell sees, from a command run as a user runs it."""
    cmd = [sys.executable, "codebase/train.py", "-opt", str(tmp_path / "missing.yml")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE and r.stderr.startswith("error: experiment file")
    assert "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE and "Traceback" in r.stderr


def test_error_is_left_for_torchruns_failure_summary(monkeypatch, tmp_path, capsys):
    import json

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    code = run_command(raising(ConfigError([("train.niter", "must be >= 1")])), [])
    assert code == 2
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["extraInfo"]["py_callstack"] == capsys.readouterr().err.strip()
    assert "train.niter: must be >= 1" in recorded["message"]
