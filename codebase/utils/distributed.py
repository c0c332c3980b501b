"""Thin helpers over ``torch.distributed`` following torchrun's environment conventions.

Every helper works whether or not a process group exists, so single-process runs and tests
call the same code paths as multi-GPU runs without special-casing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in RANK/LOCAL_RANK/WORLD_SIZE (if any).

    With WORLD_SIZE unset or 1 this does nothing and returns rank 0 of 1.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(rank=0, local_rank=0, world_size=1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device_type == "cuda":
        # Must happen before NCCL init so each rank's communicator binds to its own GPU.
        torch.cuda.set_device(local_rank)
    if not is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())


def is_initialized() -> bool:
    """True when a process group is up (``dist`` may be unavailable on some builds)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; no-op in a single process."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def _reduce_device() -> torch.device:
    # NCCL can only reduce CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over all ranks, in a single collective.

    Every rank must pass the same keys; they are sorted so dict insertion order can't differ.
    """
    if not values or not is_initialized() or world_size() == 1:
        return dict(values)
    keys = sorted(values)
    # float64 so summing many ranks' losses doesn't lose precision before the division.
    buf = torch.tensor(
        [float(values[k]) for k in keys], dtype=torch.float64, device=_reduce_device()
    )
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= world_size()
    return {k: float(v) for k, v in zip(keys, buf.tolist())}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (must be picklable); identity in a single process."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. one rank got a Ctrl-C)."""
    if not is_initialized() or world_size() == 1:
        return flag
    buf = torch.tensor([int(flag)], device=_reduce_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item())


def resolve_device(device: str | torch.device, dist: DistInfo | None = None) -> torch.device:
    """``auto`` -> cuda (this rank's GPU) when available, else cpu. ``dist`` picks the GPU of
    a bare ``cuda``; without it, the first one (single process)."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {device!r} was asked for but CUDA is not available; "
                "set `device: cpu` (or auto)"
            )
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist else 0)
    return dev
