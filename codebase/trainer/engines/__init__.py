"""Engines own device placement, mixed precision, distributed wrapping and the optimizer step.

The trainer calls the engine; the engine never knows about injectors or losses. The
experiment's top-level ``engine:`` option picks one: ``local`` (one process, or DDP under
torchrun) or ``deepspeed`` (ZeRO 0-2, options in the ``deepspeed:`` section).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.engines.base import Engine, resolve_device
from trainer.engines.local import LocalEngine
from utils.distributed import DistInfo
from utils.schema import Problems

ENGINE_NAMES = ("local", "deepspeed")

__all__ = ["ENGINE_NAMES", "Engine", "LocalEngine", "build_engine", "resolve_device",
           "validate_engine_options"]


def validate_engine_options(exp: Any, problems: Problems) -> None:
    """Check the engine's own section (``deepspeed:``); fills ``exp.deepspeed_opts``."""
    if exp.engine == "deepspeed":
        from trainer.engines.deepspeed import validate_options

        exp.deepspeed_opts = validate_options(exp, problems)
    elif exp.deepspeed:
        problems.add("deepspeed", f"is set but engine is {exp.engine!r}; add `engine: deepspeed` "
                                  "or remove the section")


def build_engine(exp: Any, device: torch.device, dist: DistInfo,
                 micro_batch: int | None) -> Engine:
    """The engine the experiment asks for; ``micro_batch`` is the per-rank batch size."""
    if exp.engine == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(device, exp.precision, dist, exp.deepspeed_opts, micro_batch)
    return LocalEngine(device, exp.precision, dist)
