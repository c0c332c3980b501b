"""Single-process and DistributedDataParallel training on one device per process."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.engines.base import NULL_CONTEXT, Engine
from trainer.oom import OomGuard
from utils.distributed import DistInfo

__all__ = ["LocalEngine"]


class LocalEngine(Engine):
    """Autocast in bf16/fp16, a GradScaler for fp16 (unscaled before clipping), DDP when the
    world size is above one, an optimizer step that skips non-finite gradients, and batches
    that run out of memory skipped on every rank (:class:`trainer.oom.OomGuard`)."""

    name = "local"

    def __init__(self, device: torch.device, precision: str, dist: DistInfo) -> None:
        super().__init__(device, precision, dist)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.oom = OomGuard(dist.world_size)
        self.ddp: list[DistributedDataParallel] = []

    def prepare(
        self,
        name: str,
        net: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        clip: float | None = None,
    ) -> nn.Module:
        """Move to the device; wrap in DDP if distributed and it has trainable parameters.

        DDP broadcasts rank 0's parameters and buffers here, so every rank starts equal.
        """
        net = net.to(self.device)
        if self.dist.world_size > 1 and any(p.requires_grad for p in net.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids)
            # Before DDP's own forward, which broadcasts buffers: ranks agree on a skip first.
            net.register_forward_pre_hook(self.oom.before_ddp_forward)
            self.ddp.append(net)
        return net

    def no_sync(self, net: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch."""
        if skip_sync and isinstance(net, DistributedDataParallel):
            return net.no_sync()
        return NULL_CONTEXT

    def oom_region(
        self, where: str, syncs_gradients: bool = False
    ) -> contextlib.AbstractContextManager:
        return self.oom.region(where, syncs_gradients)

    def after_oom(self) -> None:
        """The GradScaler needs nothing: only the optimizer step changes its state, and that is
        outside the regions. DDP's state may differ between ranks, whose forward finished on
        some and not on others: its reducer may expect a backward that never came (reset, as
        DDP itself does to recover from a failure), and whether the next forward broadcasts
        the buffers must be the same everywhere (it does, as after any update)."""
        for net in self.ddp:
            net.reducer._reset_state()
            net.require_forward_param_sync = True

    def backward(self, net: nn.Module, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        clip: float | None,
    ) -> tuple[torch.Tensor, bool]:
        """Unscale, clip, and step unless the gradient is non-finite. Returns (norm, skipped)."""
        params = [p for p in params if p.grad is not None]
        self.scaler.unscale_(optimizer)
        if clip:
            norm = nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        skipped = not math.isfinite(norm.item())
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)  # skips by itself on inf/nan and lowers the scale
            self.scaler.update()
        elif not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach(), skipped

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
