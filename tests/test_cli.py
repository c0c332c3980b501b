"""train.py as a user runs it: from the repo root or codebase/, errors, stdin commands, Ctrl-C."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, toy_options

pytestmark = pytest.mark.slow  # every test runs train.py in a subprocess


def write_yaml(tmp_path, **sections) -> Path:
    opt = toy_options(**sections)
    path = tmp_path / "exp.yml"
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def run(args, cwd=REPO, **kw):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, **kw
    )


def test_dry_run_from_root_and_codebase():
    r = run(["codebase/train.py", "-opt", "experiments/toy_regression.yml", "--dry-run"])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    r = run(
        ["train.py", "-opt", "../experiments/toy_regression.yml", "--dry-run"],
        cwd=REPO / "codebase",
    )
    assert r.returncode == 0, r.stderr
    r = run(
        ["train.py", "-opt", "experiments/toy_regression.yml", "--dry-run", "-o", "train.niter=60"],
        cwd=REPO / "codebase",
    )
    assert r.returncode == 0, r.stderr


def test_config_error_exit_code_and_message(tmp_path):
    path = write_yaml(tmp_path, train={"nitre": 3})
    r = run(["codebase/train.py", "-opt", str(path)])
    assert r.returncode == 2
    assert "train.nitre" in r.stderr and "did you mean 'niter'" in r.stderr
    assert str(path) in r.stderr
    r = run(["codebase/train.py", "-opt", "missing.yml"])
    assert r.returncode == 2 and "missing.yml" in r.stderr


def test_trains_from_repo_root(tmp_path):
    path = write_yaml(tmp_path, train={"niter": 3})
    r = run(["codebase/train.py", "-opt", str(path), "-o", "logger.print_freq=1"])
    assert r.returncode == 0, r.stderr
    assert "[step 3/3" in r.stdout
    assert (tmp_path / "toy" / "training_state" / "3.state").is_file()


def start(tmp_path, **sections) -> subprocess.Popen:
    path = write_yaml(tmp_path, **sections)
    return subprocess.Popen(
        [sys.executable, "codebase/train.py", "-opt", str(path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(proc, needle, timeout=60.0) -> str:
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    proc.kill()
    raise AssertionError(f"{needle!r} not printed; output:\n{''.join(seen)}")


def test_stdin_save_and_quit(tmp_path):
    proc = start(
        tmp_path, train={"niter": 10**7}, logger={"stdin_commands": True, "print_freq": 200}
    )
    wait_for_line(proc, "[step 200/")
    proc.stdin.write("save\n")
    proc.stdin.flush()
    wait_for_line(proc, "saved checkpoint at step")
    proc.stdin.write("bogus\nquit\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "bogus" in out and "quit" in out
    steps = sorted(int(p.stem) for p in (tmp_path / "toy" / "training_state").glob("*.state"))
    assert len(steps) == 2 and steps[-1] < 10**7


def test_ctrl_c_saves_and_resume_continues(tmp_path):
    proc = start(tmp_path, train={"niter": 10**7}, logger={"print_freq": 200})
    wait_for_line(proc, "[step 200/")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    states = list((tmp_path / "toy" / "training_state").glob("*.state"))
    assert len(states) == 1
    stopped_at = int(states[0].stem)
    path = tmp_path / "exp.yml"
    r = run(
        [
            "codebase/train.py",
            "-opt",
            str(path),
            "-o",
            f"train.niter={stopped_at + 3}",
            "-o",
            "path.resume_state=auto",
            "-o",
            "logger.print_freq=1",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and f"[step {stopped_at + 1}/" in r.stdout
