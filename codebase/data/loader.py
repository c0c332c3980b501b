"""Batch sampling that can resume mid-epoch, and the loaders the trainer uses."""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from utils.errors import UserError
from utils.seed import generator


class TooFewItems(UserError, ValueError):
    """The dataset has fewer items than one batch needs (lower batch_size, or add data)."""


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices, reshuffled each epoch from ``(seed, epoch)``, this rank's share only.

    Each rank takes a disjoint, equal-sized slice of every epoch's permutation (as
    DistributedSampler does), so all ranks run the same number of steps. Rank r's slice is
    ``order[r::world_size]``, so with ``batch_size = B / world_size`` the ranks' batches at
    step s together are exactly batch s of one process with batch size B. ``start_batch``
    skips batches already consumed, which is what makes a mid-epoch resume exact.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_items < 1:
            raise ValueError("the dataset is empty")
        self.num_items, self.batch_size, self.shuffle = num_items, batch_size, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.epoch = 0
        self.start_batch = 0
        per_rank = num_items // world_size if drop_last else math.ceil(num_items / world_size)
        self.per_rank = max(per_rank, 1)
        if drop_last and self.per_rank < batch_size:
            raise TooFewItems(
                f"batch_size {batch_size} is larger than the {self.per_rank} items "
                f"each of {world_size} rank(s) gets; lower batch_size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = generator(self.seed, self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]  # pad by wrapping (no drop_last)
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for b in range(self.start_batch, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        n = self.per_rank / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)


class TrainLoader:
    """An endless iterator over epochs that counts what it has handed out.

    The count (``epoch``, ``batches_done``) is what the trainer saves; prefetching by workers
    does not disturb it because it is advanced only when the trainer takes a batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: Any,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.epoch, self.batches_done = 0, 0
        self._iter: Iterator | None = None

    def _loader(self) -> DataLoader:
        self.batch_sampler.set_epoch(self.epoch, self.batches_done)
        g = generator(self.seed, self.epoch)  # worker seeds
        return DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_fn_of(self.dataset),
            generator=g,
            persistent_workers=False,
        )

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Any:
        while True:
            if self._iter is None:
                self._iter = iter(self._loader())
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch, self.batches_done = self.epoch + 1, 0
                if len(self.batch_sampler) == 0:
                    raise TooFewItems(
                        "the training dataset yields no batches; lower batch_size or add items"
                    ) from None
                continue
            self.batches_done += 1
            return batch

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self._iter = None


def collate_fn_of(dataset: Dataset) -> Any:
    return getattr(dataset, "collate", None) or default_collate


def make_batch_sampler(
    dataset: Dataset,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    rank: int,
    world_size: int,
) -> Any:
    """The dataset's own batch sampler if it has one, else :class:`ResumableBatchSampler`."""
    if hasattr(dataset, "make_batch_sampler"):
        return dataset.make_batch_sampler(
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
    if batch_size is None:
        raise ValueError("batch_size is required for this dataset")
    return ResumableBatchSampler(
        len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size
    )


def eval_loader(
    dataset: Dataset, batch_size: int | None, num_workers: int, rank: int, world_size: int
) -> DataLoader:
    """One ordered pass over this rank's share of ``dataset`` (validation)."""
    sampler = make_batch_sampler(dataset, batch_size, False, 0, False, rank, world_size)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn_of(dataset)
    )


def pad_batch(sequences: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad along the last dim: [.., n_i] tensors -> ([B, .., max n], lengths [B])."""
    lengths = torch.tensor([int(s.shape[-1]) for s in sequences], dtype=torch.long)
    longest = int(lengths.max()) if len(sequences) else 0
    first = sequences[0]
    out = first.new_full((len(sequences), *first.shape[:-1], longest), pad)
    for b, s in enumerate(sequences):
        out[b, ..., : s.shape[-1]] = s
    return out, lengths


def batch_size_of(batch: Any) -> int:
    """Number of items in a collated batch (first tensor's dim 0, else first list's length)."""
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    for v in values:
        if isinstance(v, (list, tuple)):
            return len(v)
    raise ValueError("cannot tell the batch size: the batch holds no tensor or list")


def split_batch(batch: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """Split a batch into ``chunks`` micro-batches along dim 0 (fewer if the batch is small)."""
    n = batch_size_of(batch)
    chunks = min(chunks, n)
    if chunks == 1:
        return [batch]
    sizes = [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]
    out: list[dict[str, Any]] = [{} for _ in range(chunks)]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            parts = value.split(sizes)
        elif isinstance(value, (list, tuple)) and len(value) == n:
            bounds = [sum(sizes[:i]) for i in range(chunks + 1)]
            parts = [value[bounds[i] : bounds[i + 1]] for i in range(chunks)]
        else:  # per-batch values (scalars, metadata) are shared by every chunk
            parts = [value] * chunks
        for i, part in enumerate(parts):
            out[i][key] = part
    return out
