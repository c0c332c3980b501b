"""The error classes a user can act on, and the one boundary every command runs inside.

A command's ``main`` raises; :func:`run_command` turns what a user can fix (a bad option, a
bad file, a full disk) into one ``error: ...`` line on stderr and a distinct exit code, and
lets real bugs through as tracebacks. ``--debug`` (or ``CODEC_TTS_DEBUG=1``) shows the
traceback for everything. Under torchrun, only rank 0 prints an error every rank shares.

Exit codes (scripts and schedulers may rely on them):

====  ==========================================================================
0     success
1     a bug: an unexpected exception (the traceback is printed)
2     a bad option or experiment file (:class:`UserError`, ``ConfigError``, argparse)
3     the run diverged: a streak of non-finite steps (``NonFiniteStreak``)
4     bad data: a corpus, data file or audio file that cannot be used (:class:`DataError`)
5     a checkpoint that is missing, corrupt or of the wrong kind (:class:`CheckpointError`)
6     the system refused: disk full, no permission, read-only file system (``OSError``)
130   interrupted (Ctrl-C)
====  ==========================================================================
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Sequence

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_DATA = 4
EXIT_CHECKPOINT = 5
EXIT_SYSTEM = 6
EXIT_INTERRUPTED = 130

DEBUG_ENV = "CODEC_TTS_DEBUG"


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""

    exit_code = EXIT_USAGE


class DataError(UserError):
    """A corpus, data file or audio file that cannot be used as it is."""

    exit_code = EXIT_DATA


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or not what the experiment needs."""

    exit_code = EXIT_CHECKPOINT


# OSErrors that come from the system or the user's files rather than from a bug.
_SYSTEM_ERRNOS = {
    errno.ENOSPC: "the disk is full: free some space (or point the output elsewhere) and rerun",
    errno.EDQUOT: "the disk quota is exhausted: free some space and rerun",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: check the file's owner and permissions",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "a folder was given where a file is expected",
    errno.ENOTDIR: "a file was given where a folder is expected",
    errno.EIO: "the storage reported an I/O error: check the disk",
}


def describe_os_error(e: OSError) -> str | None:
    """``e`` as one readable sentence with what to do, or None when it looks like a bug."""
    advice = _SYSTEM_ERRNOS.get(e.errno or -1)
    if advice is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; {advice}"


def is_debug(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def report(message: str, *, shared: bool = True) -> None:
    """Print ``error: message`` once: a ``shared`` error (every rank hits it, such as a bad
    option) only on rank 0; others on every rank, prefixed with the rank under torchrun."""
    rank = _rank()
    if shared and rank != 0:
        return
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and not shared else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def exit_code_for(e: BaseException) -> int | None:
    """The exit code for an exception a user can act on (None: a bug)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(e, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(e, UserError):
        return EXIT_USAGE
    if isinstance(e, OSError) and describe_os_error(e) is not None:
        return EXIT_SYSTEM
    return None


def run_command(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI's ``main(argv)`` inside the error boundary and return its exit code.

    Use as ``sys.exit(run_command(main))``. A ``--debug`` argument is recognised here and
    removed before ``main`` sees it.
    """
    debug = is_debug(argv)
    if argv is None:
        argv = sys.argv[1:]
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except SystemExit:
        raise  # argparse's own usage errors (exit 2) and explicit exits
    except BaseException as e:  # noqa: BLE001 - this is the boundary
        code = exit_code_for(e)
        if code is None:
            traceback.print_exc()
            print(
                "\nThis looks like a bug (an unexpected error, not a problem with your options "
                "or data). Please report it with the traceback above.",
                file=sys.stderr,
            )
            return EXIT_BUG
        if debug:
            traceback.print_exc()
        if isinstance(e, KeyboardInterrupt):
            report("interrupted")
        elif isinstance(e, OSError) and not isinstance(e, UserError):
            report(describe_os_error(e) or str(e), shared=False)
        else:
            # Option errors are the same on every rank; anything else may be rank-specific.
            report(str(e), shared=code == EXIT_USAGE)
        return code
