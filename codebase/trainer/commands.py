"""Live control of a running job: commands typed on standard input, and graceful Ctrl-C / SIGTERM.

Type ``save``, ``eval`` or ``quit`` (then Enter) into the terminal running the trainer, or write
them into a pipe feeding its stdin. The trainer polls once per step and acts between steps.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import stat
import threading
import types
from typing import BinaryIO, Callable

_log = logging.getLogger(__name__)

COMMANDS: tuple[str, ...] = ("save", "eval", "quit")

# How long the reader waits for input before re-checking whether it was stopped.
_POLL_INTERVAL_S = 0.2


def _in_background(fd: int) -> bool:
    """True when ``fd`` is our controlling terminal but another process group owns it.

    Reading it then (``python train.py &``) would send SIGTTIN and stop the whole process.
    """
    if not os.isatty(fd):
        return False
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:  # a terminal that is not our controlling one: reading it is harmless
        return False


class CommandListener:
    """Reads commands from stdin (or ``stream``) in a daemon thread; :meth:`poll` collects them.

    Only the main rank should start one: every rank of a torchrun job may share the terminal.
    """

    def __init__(
        self,
        stream: BinaryIO | None = None,
        on_message: Callable[[str], None] | None = None,
    ) -> None:
        self._stream = stream
        self.on_message = on_message
        self._commands: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._messages: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None

    def _resolve_fd(self) -> int | None:
        """The file descriptor to read, or None if there is none usable."""
        if self._stream is None:
            # Not sys.stdin: pytest and some launchers replace it, while fd 0 is the real input.
            return 0
        try:
            return self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            return None

    @staticmethod
    def _is_interactive(fd: int) -> bool:
        """A terminal or a pipe; /dev/null, regular files and closed fds would only give EOF."""
        try:
            return os.isatty(fd) or stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            return False

    def start(self) -> bool:
        """Start listening if the input is a terminal or a pipe; return whether it started."""
        if self._thread is not None and self._thread.is_alive():
            return True
        fd = self._resolve_fd()
        if fd is None or not self._is_interactive(fd):
            return False
        self._fd = fd
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="command-listener", daemon=True)
        self._thread.start()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> list[str]:
        """Commands received since the last call, oldest first; never blocks.

        Messages about unknown input are delivered here, on the caller's thread, so they print
        between training steps instead of in the middle of a progress-bar refresh.
        """
        while True:
            try:
                msg = self._messages.get_nowait()
            except queue.Empty:
                break
            if self.on_message is not None:
                self.on_message(msg)
            else:
                _log.warning(msg)
        out: list[str] = []
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        """Stop reading; returns within about the poll interval (the fd itself is not closed)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * _POLL_INTERVAL_S + 1.0)

    def _handle_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            return
        command = line.lower()
        if command in COMMANDS:
            self._commands.put(command)
        else:
            self._messages.put(f"unknown command {line!r}; valid commands: {', '.join(COMMANDS)}")

    def _wait_readable(self, fd: int) -> bool:
        """True once ``fd`` can be read without blocking forever; False when stopped."""
        if os.name == "nt":  # select() only takes sockets on Windows: block in read() instead
            return not self._stop.is_set()
        import select

        while not self._stop.is_set():
            readable, _, _ = select.select([fd], [], [], _POLL_INTERVAL_S)
            if not readable:
                continue
            if _in_background(fd):
                self._stop.wait(_POLL_INTERVAL_S)
                continue
            return True
        return False

    def _run(self) -> None:
        fd = self._fd
        assert fd is not None
        pending = b""
        try:
            while self._wait_readable(fd):
                chunk = os.read(fd, 4096)
                if not chunk:  # EOF: the writer closed the pipe or Ctrl-D on the terminal
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._handle_line(raw)
        except OSError:
            # fd closed under us or terminal gone (EIO): there is nothing more to read.
            pass
        if pending and not self._stop.is_set():
            self._handle_line(pending)  # a last command without a trailing newline


SignalHandler = Callable[[int, types.FrameType | None], object] | int | None


class GracefulInterrupt:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step.

    Check :attr:`requested` between steps. A second Ctrl-C raises :class:`KeyboardInterrupt` for
    when a step hangs. Handlers can only be installed from the main thread; elsewhere this
    context manager does nothing.
    """

    SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.on_signal = on_signal
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, SignalHandler] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # repeated SIGTERM: we are already stopping
        self.requested = True
        self.signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None means the old handler was not set from Python; the default is the best match.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
