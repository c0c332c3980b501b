"""Datasets, registered by ``mode`` with ``@register_dataset("name")``.

A dataset is a ``torch.utils.data.Dataset`` whose constructor keyword arguments are its YAML
options (besides the loader options ``batch_size``, ``n_workers``, ``shuffle`` ...). Optional
hooks the loader uses when present:

- ``collate(items) -> batch``: batch assembly (default: torch's default_collate);
- ``batch_keys``: the keys of a batch, used to check injector inputs at start-up without
  loading data (default: read from the first item);
- ``make_batch_sampler(batch_size, shuffle, seed, rank, world_size, drop_last)``: a
  :class:`data.loader.ResumableBatchSampler`-like object (e.g. token-budget buckets);
- ``check_options(kwargs, path, problems)`` (static): checks of its validated options beyond
  their types, run at validation (e.g. the names inside ``hdf5_codes``'s ``prepare:``);
- ``checkpoint_metadata() -> dict[str, str]``: strings saved in every network checkpoint
  (e.g. the phoneme vocabulary and codec config that inference needs).
"""

from __future__ import annotations

from typing import Callable

from utils.registry import Registry

DATASETS: Registry = Registry("dataset")


def register_dataset(name: str | None = None) -> Callable:
    """Decorator registering a dataset class under its YAML ``mode`` name."""
    return DATASETS.register(name)
