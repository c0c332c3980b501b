"""Engines own device placement, mixed precision, distributed wrapping and the optimizer step.

The trainer calls the engine; the engine never knows about injectors or losses. The
experiment's top-level ``engine:`` option picks one: ``local`` (one process, or DDP under
torchrun) or ``deepspeed`` (ZeRO 0-2, options in the ``deepspeed:`` section).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.engines.base import Engine
from trainer.engines.deepspeed import DeepSpeedEngine, validate_options
from trainer.engines.local import LocalEngine
from utils.distributed import DistInfo
from utils.schema import Problems

__all__ = ["Engine", "LocalEngine", "build_engine", "validate_engine_options"]


def validate_engine_options(engine: str, section: dict, exp: Any, problems: Problems) -> Any:
    """The engine's own options (the ``deepspeed:`` section) checked against the rest of the
    validated experiment ``exp``; None for the local engine."""
    if engine == "deepspeed":
        return validate_options(section, exp, problems)
    if section:
        problems.add(
            "deepspeed",
            f"is set but engine is {engine!r}; add `engine: deepspeed` or remove the section",
        )
    return None


def build_engine(exp: Any, device: torch.device, dist: DistInfo, micro_batch: int | None) -> Engine:
    """The engine the experiment asks for; ``micro_batch`` is the per-rank batch size."""
    if exp.engine == "deepspeed":
        return DeepSpeedEngine(device, exp.precision, dist, exp.deepspeed, micro_batch)
    return LocalEngine(device, exp.precision, dist)
