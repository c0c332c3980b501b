"""Averaging of per-step values between console/TensorBoard lines, without per-step syncs."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class Meter:
    """Collects per-step tensors (kept on device; stacked only when read) and throughput."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.items = 0
        self.steps = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], items: int, data_time: float) -> None:
        for k, v in logs.items():
            self.values[k].append(v)
        self.items += items
        self.steps += 1
        self.data_time += data_time

    def summary(self) -> dict[str, float]:
        """Means over the window, plus samples/s, step time and data-wait time."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {}
        if self.values:
            keys = list(self.values)
            means = torch.stack([torch.stack(self.values[k]).float().mean() for k in keys])
            out = dict(zip(keys, means.tolist()))
        if self.steps:
            out["perf/samples_per_sec"] = self.items / elapsed
            out["perf/step_time_s"] = elapsed / self.steps
            out["perf/data_time_s"] = self.data_time / self.steps
        return out
