"""Networks, registered with ``@register_model("name")`` on a class or factory function.

YAML: ``networks.<name>: {type: generator, which_model_G: <registered name>, kwargs: {...}}``;
the kwargs are the factory's keyword arguments and are saved in each checkpoint's metadata,
so :func:`load_network` rebuilds a network from its file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from utils.io import load_module, read_network_metadata
from utils.registry import Registry

MODELS: Registry = Registry("model")


def register_model(name: str | None = None) -> Callable:
    """Decorator registering a network class or factory under ``name``."""
    return MODELS.register(name)


def build_network(which_model: str, kwargs: dict[str, Any]) -> nn.Module:
    return MODELS.get(which_model)(**kwargs)


def load_network(path: str | Path, strict: bool = True) -> nn.Module:
    """Rebuild a network from a checkpoint written by the trainer (config in its metadata)."""

    meta = read_network_metadata(Path(path))
    net = build_network(meta["which_model"], meta["kwargs"])
    load_module(net, Path(path), strict=strict)
    return net
