"""What every engine shares: device choice, autocast, and the interface the trainer calls."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from utils.distributed import DistInfo

NULL_CONTEXT = contextlib.nullcontext()  # reusable: entering it has no state
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class Engine:
    """Device placement, mixed precision, data-parallel wrapping and the optimizer step.

    The trainer builds each trained network and its optimizer, then calls :meth:`prepare`;
    :class:`trainer.steps.ConfigurableStep` calls :meth:`autocast`, :meth:`no_sync`,
    :meth:`backward` and :meth:`step` with the prepared network. Subclasses implement those;
    autocast (bf16/fp16 with fp32 weights) is the same for all engines.
    """

    name = "base"
    # True when the engine saves optimizer state itself (in :meth:`save_checkpoint`), so the
    # trainer leaves it out of its own training-state file.
    owns_optimizer_state = False

    def __init__(self, device: torch.device, precision: str, dist: DistInfo) -> None:
        self.device, self.precision, self.dist = device, precision, dist
        self.dtype = DTYPES[precision]

    def prepare(
        self,
        name: str,
        net: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        clip: float | None = None,
    ) -> nn.Module:
        """Move trainable network ``name`` to the device and wrap it for training (``optimizer``
        is None when no step trains it; ``clip`` is its step's gradient-norm limit)."""
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return NULL_CONTEXT
        return torch.autocast(self.device.type, dtype=self.dtype)

    def no_sync(self, net: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch: ``skip_sync`` on all but the last one of an update."""
        return NULL_CONTEXT

    def oom_region(
        self, where: str, syncs_gradients: bool = False
    ) -> contextlib.AbstractContextManager:
        """Around a training forward or backward (``where``, for the message): an engine that
        can skip a batch turns an out-of-memory error there into
        :class:`trainer.oom.BatchOutOfMemory`, raised on every rank alike. Here (DeepSpeed)
        it stays fatal. ``syncs_gradients``: the backward that reduces gradients over ranks."""
        return NULL_CONTEXT

    def after_oom(self) -> None:
        """Make the engine ready for the next batch after one was skipped for lack of memory."""

    def backward(self, net: nn.Module, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        clip: float | None,
    ) -> tuple[torch.Tensor, bool]:
        """Apply the accumulated gradients. Returns (gradient norm, whether it was skipped)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Small engine state kept in the trainer's training-state file."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_checkpoint(self, folder: Path) -> None:
        """Write engine-owned files (every rank calls this); nothing for most engines."""

    def load_checkpoint(self, folder: Path) -> None:
        """Read what :meth:`save_checkpoint` wrote (every rank calls this)."""
