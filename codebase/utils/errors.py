"""The error classes a user can act on, and the one boundary every command runs inside.

A command's ``main`` raises; :func:`run_command` turns what a user can fix (a bad option, a
bad file, a full disk) into one ``error: ...`` line on stderr and a distinct exit code, and
lets real bugs through as tracebacks. ``--debug`` (or ``CODEC_TTS_DEBUG=1``) shows the
traceback for everything. Under torchrun, only rank 0 prints an error every rank shares.

Exit codes (scripts and schedulers may rely on them):

====  ==========================================================================
0     success
1     a bug: an unexpected exception (the traceback is printed)
2     a bad option, experiment file or path (:class:`UserError`, ``ConfigError``, argparse,
      a file or folder that does not exist)
3     the run diverged: a streak of non-finite steps (``NonFiniteStreak``)
4     bad data: a corpus, data file or audio file that cannot be used (:class:`DataError`)
5     a checkpoint that is missing, corrupt or of the wrong kind (:class:`CheckpointError`)
6     the system refused: disk full, no permission, read-only file system (``OSError``),
      out of memory (also ``max_oom_streak`` batches in a row: ``OutOfMemoryStreak``)
130   interrupted (Ctrl-C)
====  ==========================================================================
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
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
_SHARED_ERROR_GRACE_S = 2.0  # how long ranks > 0 wait before exiting on an error rank 0 prints
DEBUG_FLAG = "--debug"
DEBUG_HELP = f"on an error, print the full traceback (also {DEBUG_ENV}=1)"


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do.

    ``shared`` says every rank of a distributed run hits it alike (a bad option, a missing
    checkpoint), so only rank 0 prints it.
    """

    exit_code = EXIT_USAGE
    shared = True


class DataError(UserError):
    """A corpus, data file or audio file that cannot be used as it is."""

    exit_code = EXIT_DATA
    shared = False  # ranks read different items: the one that met it says so


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or not what the experiment needs."""

    exit_code = EXIT_CHECKPOINT


# OSErrors that come from the system or the user's files rather than from a bug:
# errno -> (exit code, what to do).
_OS_ERRNOS = {
    errno.ENOSPC: (
        EXIT_SYSTEM,
        "the disk is full: free some space (or point the output elsewhere) and rerun",
    ),
    errno.EDQUOT: (EXIT_SYSTEM, "the disk quota is exhausted: free some space and rerun"),
    errno.EACCES: (
        EXIT_SYSTEM,
        "permission denied: choose a folder you can write to, or fix its permissions",
    ),
    errno.EPERM: (EXIT_SYSTEM, "operation not permitted: check the file's owner and permissions"),
    errno.EROFS: (EXIT_SYSTEM, "the file system is read-only: write somewhere else"),
    errno.EIO: (EXIT_SYSTEM, "the storage reported an I/O error: check the disk"),
    errno.EMFILE: (EXIT_SYSTEM, "too many open files: raise `ulimit -n` or use fewer workers"),
    errno.ENOENT: (EXIT_USAGE, "no such file or folder: check the path"),
    errno.EISDIR: (EXIT_USAGE, "a folder was given where a file is expected"),
    errno.ENOTDIR: (EXIT_USAGE, "a file was given where a folder is expected"),
}
# An OSError raised with only a message (``FileNotFoundError("checkpoint x does not exist")``)
# has no errno; its class says which kind it is.
_OS_CLASSES = (
    (FileNotFoundError, errno.ENOENT),
    (PermissionError, errno.EACCES),
    (IsADirectoryError, errno.EISDIR),
    (NotADirectoryError, errno.ENOTDIR),
)


def _os_errno(e: OSError) -> int | None:
    if e.errno is not None:
        return e.errno
    return next((code for cls, code in _OS_CLASSES if isinstance(e, cls)), None)


def describe_os_error(e: OSError) -> str | None:
    """``e`` as one readable sentence with what to do, or None when it looks like a bug."""
    code = _os_errno(e)
    if code not in _OS_ERRNOS:
        return None
    if e.errno is None:  # raised by our code with its own message, which says what to do
        return str(e)
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; {_OS_ERRNOS[code][1]}"


def _is_out_of_memory(e: BaseException) -> bool:
    # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError, without importing torch here
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def _describe_out_of_memory(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "CPU"
    return (
        f"out of {where} memory ({first}); lower the batch size (or raise mega_batch_factor), "
        f"shorten the items (max_wav_length), or use a smaller model"
    )


def is_debug(argv: Sequence[str] | None) -> bool:
    """Whether tracebacks are wanted: ``--debug`` among the arguments, or CODEC_TTS_DEBUG set."""
    args = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def report(message: str, *, shared: bool = True) -> None:
    """Print ``error: message`` once: a ``shared`` error (every rank hits it, such as a bad
    option) only on rank 0; others on every rank, prefixed with the rank under torchrun."""
    rank = _rank()
    # Every rank leaves it for torchrun's summary: whichever rank torchrun sees fail first
    # is the summary's root cause, and rank 0 may be stopped before it gets that far.
    _record_for_torchrun(f"error: {message}")
    if shared and rank != 0:
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            # torchrun stops the other ranks when one exits: give rank 0 the time to print
            time.sleep(_SHARED_ERROR_GRACE_S)
        return
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and not shared else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def _record_for_torchrun(message: str) -> None:
    """Under torchrun, also leave the message where its failure summary looks for it (the
    file ``TORCHELASTIC_ERROR_FILE`` names; the format of torch's ``@record``), so the
    summary's root cause shows this message instead of ``<N/A>``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))},
        }
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the message was printed; the summary is a convenience


def exit_code_for(e: BaseException) -> int | None:
    """The exit code for an exception a user can act on (None: a bug)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(e, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(e, UserError):
        return EXIT_USAGE
    if isinstance(e, OSError) and describe_os_error(e) is not None:
        return _OS_ERRNOS[_os_errno(e)][0]
    if _is_out_of_memory(e):
        return EXIT_SYSTEM
    return None


def _exit_status(e: SystemExit) -> int:
    """What the interpreter would exit with for ``sys.exit(code)`` (a message is printed)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return EXIT_BUG


def run_command(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI's ``main(argv)`` inside the error boundary and return its exit code.

    Use as ``sys.exit(run_command(main))``. A ``--debug`` argument is recognised here and
    removed before ``main`` sees it. ``SystemExit`` (argparse's usage errors, exit 2) becomes
    its exit code, so a caller in the same process gets a code for every outcome.
    """
    debug = is_debug(argv)
    if argv is None:
        argv = sys.argv[1:]
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return int(main(argv) or 0)
    except SystemExit as e:
        return _exit_status(e)
    except BaseException as e:  # noqa: BLE001 - this is the boundary
        code = exit_code_for(e)
        if code is None:
            traceback.print_exc()
            print(
                "\nThis looks like a bug (an unexpected error, not a problem with your options "
                "or data). Please report it with the traceback above.",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_BUG
        if debug:
            traceback.print_exc()
        if isinstance(e, KeyboardInterrupt):
            report("interrupted")
        elif isinstance(e, OSError) and not isinstance(e, UserError):
            report(describe_os_error(e) or str(e), shared=False)
        elif _is_out_of_memory(e):
            report(_describe_out_of_memory(e), shared=False)
        else:
            report(str(e), shared=bool(getattr(e, "shared", True)))
        return code
