"""Length-bucketed batches under a token budget, resumable mid-epoch, sharded across ranks."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from utils.seed import generator


class BucketBatchSampler(Sampler[list[int]]):
    """Groups items of similar length so that padding is small.

    Each epoch: a seeded permutation, then sorting inside pools of ``pool_batches`` batches
    (similar lengths end up together while the data order stays random), then greedy packing:
    a batch takes items while ``max(len) * n_items <= max_tokens`` (or ``batch_size`` items),
    then the batches are shuffled. Under DDP every rank gets the same number of batches,
    disjoint ones (``batches[rank::world_size]``, the list padded by wrapping).

    Args:
        lengths: the cost of each item in tokens (e.g. code frames + phonemes + prompt).
        max_tokens: token budget per batch (padded size); or
        batch_size: a fixed number of items per batch (exactly one of the two).
        on_epoch: called with the epoch when it is set (datasets seed per-item randomness with it).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pool_batches: int = 64,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if (max_tokens is None) == (batch_size is None):
            raise ValueError("give exactly one of max_tokens (token budget) or batch_size")
        if max_tokens is not None and max(lengths) > max_tokens:
            raise ValueError(
                f"max_tokens {max_tokens} is smaller than the longest item "
                f"({max(lengths)} tokens); raise max_tokens or filter long items"
            )
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.max_tokens, self.batch_size, self.shuffle = max_tokens, batch_size, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.pool_batches, self.on_epoch = pool_batches, on_epoch
        self.epoch, self.start_batch = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def _generator(self, salt: int) -> torch.Generator:
        return generator(self.seed, salt, self.epoch)

    def _pack(self, order: list[int]) -> list[list[int]]:
        batches, batch, longest = [], [], 0
        for i in order:
            n = int(self.lengths[i])
            if self.batch_size is not None:
                full = len(batch) == self.batch_size
            else:
                full = bool(batch) and max(longest, n) * (len(batch) + 1) > self.max_tokens
            if full:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, n)
        if batch and not (
            self.drop_last and self.batch_size is not None and len(batch) < self.batch_size
        ):
            batches.append(batch)
        return batches

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (deterministic in seed and epoch)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.lengths)
        order = torch.randperm(n, generator=self._generator(0)) if self.shuffle else torch.arange(n)
        typical = self.batch_size or max(1, self.max_tokens // max(1, int(self.lengths.median())))
        pool = max(1, typical * self.pool_batches)
        sorted_order: list[int] = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            # stable sort by length inside the pool; equal lengths keep the random order
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            sorted_order += chunk.tolist()
        batches = self._pack(sorted_order)
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=self._generator(1)).tolist()
            batches = [batches[i] for i in perm]
        per_rank = (
            len(batches) // self.world_size
            if self.drop_last
            else math.ceil(len(batches) / self.world_size)
        )
        if per_rank == 0:
            raise ValueError(
                f"{len(batches)} batch(es) cannot be shared by {self.world_size} "
                "ranks; use a smaller batch or more data"
            )
        total = per_rank * self.world_size
        batches = (batches * math.ceil(total / len(batches)))[:total]
        mine = batches[self.rank :: self.world_size]
        self._cache = (self.epoch, mine)
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches()[self.start_batch :]

    def __len__(self) -> int:
        return len(self.epoch_batches())
