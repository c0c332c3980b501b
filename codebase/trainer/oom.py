"""Out of memory in a training batch: skip the batch on every rank, say why, stop on a streak.

A CUDA out-of-memory error in a step's forward or backward need not end a run: one long batch
can be dropped and training goes on with the next. :class:`OomGuard` turns
``torch.OutOfMemoryError`` in those regions into :class:`BatchOutOfMemory`, and under DDP it
makes every rank raise it at the same point, so that no rank is left waiting in a collective
the others never join. The trainer then clears the gradients and counts the batch (see
``ExtensibleTrainer._skip_oom_batch``); ``train.max_oom_streak`` batches in a row stop the run
with :class:`OutOfMemoryStreak`, whose message says what to lower.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from data.loader import batch_size_of
from utils import distributed
from utils.errors import EXIT_SYSTEM

# What makes a batch need less memory, for the streak's message.
REMEDIES = (
    "lower datasets.train.batch_size (or max_tokens for token-budget batches), shorten the "
    "longest items (max_wav_length / max_text_length, or max_frames for hdf5_codes), raise "
    "train.mega_batch_factor (gradient accumulation: the same update in smaller "
    "micro-batches) or set checkpointing_enabled: true (recompute activations in backward)"
)


class BatchOutOfMemory(Exception):
    """A training batch ran out of memory on this rank (``message`` is torch's first line) or,
    under DDP, on another one (``message`` is None); every rank skips it."""

    def __init__(self, where: str, message: str | None) -> None:
        self.where, self.message = where, message
        super().__init__(f"out of memory in {where}: {message or 'on another rank'}")


class OutOfMemoryStreak(RuntimeError):
    """``train.max_oom_streak`` training batches in a row ran out of memory."""

    exit_code = EXIT_SYSTEM


class OomGuard:
    """Catches ``torch.OutOfMemoryError`` around a training forward or backward.

    In one process the error becomes :class:`BatchOutOfMemory` at once. Under DDP a rank that
    ran out cannot just leave: the others would wait for it in their next collective. So the
    ranks agree (a one-number all-reduce, at the same points on every rank) at the end of each
    region, and before each call of a DDP-wrapped network (:meth:`before_ddp_forward`), which
    broadcasts buffers as it starts; all ranks raise when any ran out. The backward that
    all-reduces gradients (the last micro-batch's) cannot be agreed on halfway, so there an
    out-of-memory error stays fatal under DDP.
    """

    def __init__(self, world_size: int) -> None:
        self.distributed = world_size > 1
        self._inside = False  # in a region: DDP forwards are agreement points

    @contextlib.contextmanager
    def region(self, where: str, syncs_gradients: bool = False) -> Iterator[None]:
        """Around ``where`` (e.g. "the forward of step 'gpt'"); ``syncs_gradients``: the
        backward in which DDP all-reduces gradients."""
        if self.distributed and syncs_gradients:
            yield  # fatal under DDP: the other ranks are inside the gradient all-reduce
            return
        error = None
        self._inside = True
        try:
            yield
        except torch.OutOfMemoryError as e:
            # Only its text is kept: the exception's traceback holds the failed graph.
            error = _first_line(e)
        finally:
            self._inside = False
        self._agree(where, error)

    def before_ddp_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of each DDP-wrapped network: an agreement point inside a region."""
        if self._inside and self.distributed:
            self._agree("the forward of a network", None)

    def _agree(self, where: str, error: str | None) -> None:
        failed = distributed.any_rank(error is not None) if self.distributed else error is not None
        if failed:
            self._inside = False
            raise BatchOutOfMemory(where, error)


def _first_line(e: BaseException) -> str:
    """Torch's message up to its second sentence: "CUDA out of memory. Tried to allocate
    2.00 GiB" (the rest is advice on the allocator)."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ". ".join(line.split(". ")[:2]).rstrip(".")


def describe_batch(batch: Any) -> str:
    """ "16 items: wav [16, 255995], codes [16, 4, 1480]": each tensor's shape, whose padded
    lengths are those of the batch's longest item."""
    if not isinstance(batch, dict):
        return "a batch"
    shapes = [
        f"{k} {list(v.shape)}"
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]
    try:
        size = f"{batch_size_of(batch)} items"
    except ValueError:
        size = "a batch"
    return f"{size}: {', '.join(shapes)}" if shapes else size


def describe_failures(failures: list[tuple[int, str, str, str]], world_size: int) -> str:
    """One line per rank that ran out: ``(rank, where, torch's message, batch shapes)``."""
    return "; ".join(
        (f"rank {rank}: " if world_size > 1 else "")
        + f"in {where} on a batch of {shapes} ({message})"
        for rank, where, message, shapes in failures
    )


def streak_message(streak: list[str], step: int, state: Path, shown: int = 5) -> str:
    """Why the run stops: the streak's failed batches (the last ``shown``), where the weights
    were saved and what would make the batches fit."""
    last = streak[-shown:]
    batches = "; ".join(f"{i}) {d}" for i, d in enumerate(last, 1))
    which = f" (the last {len(last)})" if len(streak) > len(last) else ""
    return (
        f"stopping: {len(streak)} batches in a row ran out of memory after step {step} and "
        f"were skipped{which}: {batches}. The weights, which these batches did not change, are "
        f"saved: {state}. To fit the batches in memory, {REMEDIES}; then resume with "
        f"path.resume_state={state}. Or raise train.max_oom_streak (null: never stop)"
    )
