"""Engines own device placement, mixed precision, distributed wrapping and the optimizer step.

The trainer calls the engine; the engine never knows about injectors or losses.
"""
from trainer.engines.local import LocalEngine, resolve_device

__all__ = ["LocalEngine", "resolve_device"]
