"""The one codec interface used by injectors, data preparation and synthesis."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from utils.errors import UserError
from utils.registry import Registry

CODECS: Registry = Registry("codec")


class CodecUnavailable(UserError, RuntimeError):
    """A codec cannot be built here: a missing package or missing pretrained weights.

    The message says what is missing and how to fix it (which file, where to put it, or which
    ``pip install``). A command that meets it exits with the usage error code 2.
    """


class Codec(nn.Module):
    """Audio <-> discrete codes.

    Attributes every backend sets: ``sample_rate`` (Hz of the audio it takes and returns),
    ``frame_rate`` (code frames per second), ``n_levels`` (residual codebooks per frame),
    ``codebook_size`` (entries per codebook).
    """

    sample_rate: int
    frame_rate: float
    n_levels: int
    codebook_size: int

    @property
    def device(self) -> torch.device:
        """Where the codec's weights are (inputs are moved there)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav`` [B, T] (or [T]) float in [-1, 1] at ``sample_rate`` -> codes [B, n_levels,
        frames] (long; ``[n_levels, frames]`` for a 1-d input)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n_levels, frames] (or [n_levels, frames]) -> wav [B, T] (or [T])."""
        raise NotImplementedError

    def frames_for(self, num_samples: int) -> int:
        """Number of code frames ``encode`` returns for ``num_samples`` samples."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The options that rebuild this codec with :func:`build_codec` (saved with data/models)."""
        raise NotImplementedError


def register_codec(name: str) -> Callable:
    """Decorator registering a Codec subclass (or factory returning one) under ``name``."""
    return CODECS.register(name)


def build_codec(name: str, **options: Any) -> Codec:
    """Build a registered codec by name with its options (see each backend's constructor)."""
    return CODECS.get(name)(**options)


def as_batch(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, bool]:
    """Add a batch dim if ``x`` has ``dims - 1`` dims; returns (tensor, whether one was added)."""
    if x.dim() == dims - 1:
        return x.unsqueeze(0), True
    if x.dim() != dims:
        raise ValueError(
            f"expected a tensor with {dims - 1} or {dims} dims, got shape {tuple(x.shape)}"
        )
    return x, False


def resolve_checkpoint(
    checkpoint: str | Path | None, default_cache: Path | None, what: str, how: str
) -> Path:
    """The weights file to load: ``checkpoint`` if given, else the library's cache path.

    Raises :class:`CodecUnavailable` naming the missing file and where to put it.
    """
    candidates = [Path(checkpoint).expanduser()] if checkpoint else []
    if default_cache is not None:
        candidates.append(default_cache)
    for c in candidates:
        if c.is_file():
            return c
    looked = " or ".join(str(c) for c in candidates) or "(no path)"
    raise CodecUnavailable(
        f"{what}: pretrained weights not found at {looked}. This machine cannot download them; "
        f"{how}. Or set `pretrained: false` for randomly initialised weights (tests only)."
    )
