"""Test plugin: an injector that runs out of memory on chosen batches, and a network with a
buffer (DDP broadcasts buffers as each forward starts: a collective the OOM agreement must not
cross)."""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from torch import nn

from models import register_model
from trainer.injectors import Injector
from utils import distributed
from utils.schema import PositiveInt


class FakeOomInjector(Injector):
    """Passes ``in`` on as ``out``; raises ``torch.OutOfMemoryError`` as CUDA would on the
    training calls numbered in ``oom_at`` (1-based, one call per micro-batch, counted from the
    start of this process), in the forward or (from a gradient hook) in the backward."""

    def __init__(
        self,
        oom_at: list[int] | None = None,
        phase: Literal["forward", "backward"] = "forward",
        ranks: list[int] | None = None,  # None: every rank
    ) -> None:
        super().__init__()
        self.oom_at, self.phase, self.ranks = set(oom_at or ()), phase, ranks
        self.calls = 0
        self._failed: weakref.ref | None = None  # the tensor of the last failed call
        self.failed_alive: list[bool] = []  # was it still alive at the next call?

    def forward(self, state: dict) -> dict:
        x = state[self.input]
        if not self.training:
            return {self.output: x}
        if self._failed is not None:
            self.failed_alive.append(self._failed() is not None)
            self._failed = None
        self.calls += 1
        if self.calls in self.oom_at and (self.ranks is None or distributed.rank() in self.ranks):
            self._failed = weakref.ref(x)
            if self.phase == "forward":
                raise torch.OutOfMemoryError(oom_message(self.calls))
            x = x * 1.0  # a tensor of its own to hook (x may be a leaf of the batch)
            x.register_hook(lambda grad, call=self.calls: _raise(call))
        return {self.output: x}


def oom_message(call: int) -> str:
    return (
        f"CUDA out of memory. Tried to allocate {call}.00 GiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 1.50 GiB is free. If reserved but unallocated memory is large try "
        "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )


def _raise(call: int) -> None:
    raise torch.OutOfMemoryError(oom_message(call))


@register_model("buffered_linear")
class BufferedLinear(nn.Module):
    """A linear layer that counts the items it saw in a (non-persistent) buffer, and runs out
    of memory inside its forward on the training calls ``oom_at`` of the ``ranks``."""

    def __init__(
        self,
        in_dim: PositiveInt = 16,
        out_dim: PositiveInt = 4,
        oom_at: list[int] | None = None,
        ranks: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.register_buffer("seen", torch.zeros(()), persistent=False)
        self.oom_at, self.ranks, self.calls = set(oom_at or ()), ranks, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        y = self.linear(x)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.oom_at and (
                self.ranks is None or distributed.rank() in self.ranks
            ):
                raise torch.OutOfMemoryError(oom_message(self.calls))
        return y
