"""Seeding and capture/restore of every RNG training draws from, so a resume continues exactly."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and all CUDA devices)."""
    if not 0 <= seed < 2**32:
        # numpy's legacy seeding accepts only this range; fail here rather than deep inside numpy.
        raise ValueError(f"seed must be in [0, 2**32), got {seed}; change the `seed` option")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derive_seed(seed: int, *parts: int) -> int:
    """The seed of one use of a run's ``seed``: an epoch, an item, a rank ... The same parts
    give the same seed on every machine and Python run (no ``hash()``), different parts give
    unrelated streams. Every derived seed in the project comes from here."""
    mixed = seed * 1_000_003 + sum(p * 7919**i for i, p in enumerate(parts))
    return mixed % 2**32  # what every consumer accepts (numpy's legacy seeding included)


def generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def rng_state() -> dict[str, Any]:
    """Capture all RNG states using only types ``torch.load(weights_only=True)`` accepts."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            # 625 words < 2**32 each: int64 holds them exactly and avoids a huge pickled tuple.
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            # Resuming on a different number of GPUs: restore what lines up, the rest stay seeded.
            logger.warning(
                "RNG state holds %d CUDA device(s) but %d are visible; restoring the first %d",
                len(cuda_states),
                count,
                min(count, len(cuda_states)),
            )
        for index, device_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(device_state, index)
    elif cuda_states:
        logger.warning("RNG state holds CUDA states but CUDA is not available; they are ignored")
