"""Live commands (CommandListener), graceful interrupts, and the distributed helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trainer.commands import CommandListener, GracefulInterrupt
from utils import distributed

CODEBASE = Path(__file__).resolve().parents[1] / "codebase"


def _poll_until(listener: CommandListener, n: int, timeout: float = 5.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += listener.poll()
        time.sleep(0.01)
    return got


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- CommandListener -----------------------------------------------------------------------------


def test_listener_reads_commands_from_a_pipe() -> None:
    r, w = os.pipe()
    messages: list[str] = []
    with open(r, "rb", buffering=0) as stream:
        listener = CommandListener(stream, on_message=messages.append)
        assert listener.start()
        os.write(w, b"save\nfoo\n  QUIT \n\n")
        assert _poll_until(listener, 2) == ["save", "quit"]
        assert listener.poll() == []  # already collected
        assert len(messages) == 1
        assert "'foo'" in messages[0] and all(c in messages[0] for c in ("save", "eval", "quit"))
        os.write(w, b"ev")  # a line split over two writes is still one command
        time.sleep(0.05)
        os.write(w, b"al\n")
        assert _poll_until(listener, 1) == ["eval"]
        os.close(w)  # EOF ends the reader thread quietly
        assert _wait_until(lambda: not listener.running)
        listener.stop()


def test_listener_takes_a_last_line_without_newline_at_eof() -> None:
    r, w = os.pipe()
    with open(r, "rb", buffering=0) as stream:
        listener = CommandListener(stream)
        assert listener.start()
        os.write(w, b"save")
        os.close(w)
        assert _wait_until(lambda: not listener.running)
        assert listener.poll() == ["save"]


def test_listener_stop_ends_the_thread_while_the_pipe_is_open() -> None:
    r, w = os.pipe()
    try:
        with open(r, "rb", buffering=0) as stream:
            listener = CommandListener(stream)
            assert listener.start()
            assert listener.start()  # already running: still True, no second thread
            listener.stop()
            assert not listener.running
    finally:
        os.close(w)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_listener_reads_commands_from_a_terminal() -> None:
    controller, terminal = os.openpty()
    try:
        with open(terminal, "rb", buffering=0, closefd=False) as stream:
            listener = CommandListener(stream)
            assert listener.start()
            os.write(controller, b"Save\n")  # what a user typing "Save" + Enter sends
            assert _poll_until(listener, 1) == ["save"]
            listener.stop()
            assert not listener.running
    finally:
        os.close(controller)
        os.close(terminal)


def test_listener_does_not_start_on_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "commands.txt"
    path.write_bytes(b"save\n")
    with open(path, "rb") as stream:
        listener = CommandListener(stream)
        assert listener.start() is False
        assert not listener.running and listener.poll() == []


def test_listener_does_not_start_on_dev_null() -> None:
    with open(os.devnull, "rb") as stream:
        assert CommandListener(stream).start() is False


def _run_listener_child(stdin_setup: str, stdin: int | None, data: bytes | None = None) -> dict:
    """Runs a CommandListener on the child's real fd 0 (sys.stdin is never used)."""
    code = (
        "import json, os, sys, time\n"
        f"{stdin_setup}\n"
        "from trainer.commands import CommandListener\n"
        "msgs = []\n"
        "l = CommandListener(on_message=msgs.append)\n"
        "started = l.start()\n"
        "got = []\n"
        "deadline = time.monotonic() + 5\n"
        "while started and len(got) < 2 and time.monotonic() < deadline:\n"
        "    got += l.poll(); time.sleep(0.01)\n"
        "print(json.dumps({'started': started, 'got': got, 'msgs': msgs}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(CODEBASE))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=data,
        stdin=None if data is not None else stdin,
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


@pytest.mark.slow  # a child Python process
def test_listener_uses_fd0_by_default_with_piped_stdin() -> None:
    result = _run_listener_child("", None, data=b"eval\nhelp\nsave\n")
    assert result == {
        "started": True,
        "got": ["eval", "save"],
        "msgs": ["unknown command 'help'; valid commands: save, eval, quit"],
    }


@pytest.mark.slow  # two child Python processes
def test_listener_does_not_start_without_usable_stdin() -> None:
    assert _run_listener_child("", subprocess.DEVNULL)["started"] is False
    assert _run_listener_child("os.close(0)", subprocess.DEVNULL)["started"] is False


# --- GracefulInterrupt -------------------------------------------------------------------------


def test_first_sigint_requests_stop_second_raises() -> None:
    before = signal.getsignal(signal.SIGINT)
    before_term = signal.getsignal(signal.SIGTERM)
    seen: list[int] = []
    with GracefulInterrupt(on_signal=seen.append) as stop:
        assert signal.getsignal(signal.SIGINT) != before
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_until(lambda: stop.requested, timeout=2.0)
        assert seen == [signal.SIGINT] and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2.0)  # the handler raises out of the sleep
    assert signal.getsignal(signal.SIGINT) == before
    assert signal.getsignal(signal.SIGTERM) == before_term


def test_sigterm_requests_stop_and_repeats_are_ignored() -> None:
    with GracefulInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_until(lambda: stop.requested, timeout=2.0)
        os.kill(os.getpid(), signal.SIGTERM)  # must not kill the process or raise
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM


def test_graceful_interrupt_is_a_no_op_off_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGINT)
    result: dict[str, object] = {}

    def worker() -> None:
        with GracefulInterrupt() as stop:
            result["handler"] = signal.getsignal(signal.SIGINT)
            result["requested"] = stop.requested

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result == {"handler": before, "requested": False}


# --- utils.distributed -------------------------------------------------------------------------


def test_distributed_helpers_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed("cpu")
    assert info == distributed.DistInfo(rank=0, local_rank=0, world_size=1) and info.is_main
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    values = {"loss": 0.5, "acc": 2.0}
    assert distributed.all_reduce_mean(values) == values
    assert distributed.broadcast_object({"a": [1]}) == {"a": [1]}
    assert not distributed.DistInfo(rank=1, local_rank=1, world_size=2).is_main


def _gloo_worker(local_rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE="2",
    )
    import torch.distributed as dist

    info = distributed.init_distributed("cpu")
    try:
        # Keys in a different insertion order per rank: the helper must still line them up.
        values = {"loss": float(info.rank), "acc": 10.0 + 2 * info.rank}
        if info.rank == 1:
            values = dict(reversed(list(values.items())))
        mean = distributed.all_reduce_mean(values)
        obj = distributed.broadcast_object({"from": info.rank})
        distributed.barrier()
        result = {
            "info": [info.rank, info.local_rank, info.world_size],
            "mean": mean,
            "obj": obj,
            "is_main": distributed.is_main(),
            "world": distributed.world_size(),
        }
        Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_mean_with_two_gloo_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["info"] == [r, r, 2] and res["world"] == 2 and res["is_main"] == (r == 0)
        assert res["mean"] == pytest.approx({"loss": 0.5, "acc": 11.0})
        assert res["obj"] == {"from": 0}
