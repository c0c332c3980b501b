"""The toy experiment that the DDP and DeepSpeed tests launch, and readers of what it wrote."""
from __future__ import annotations

from pathlib import Path

import torch

import dist_worker
from conftest import merge, toy_options

NITER = 8
# 40 items, global batch 8: 5 steps per epoch, so the run crosses a reshuffle. No dropout,
# fp32; clipping and a schedule so that more than the plain gradient has to agree.
SECTIONS = dict(
    datasets={"train": {"batch_size": 8, "num_items": 40},
              "val": {"mode": "toy_regression", "batch_size": 8, "num_items": 16}},
    steps={"fit": {"clip_grad_eps": 0.5}},
    train={"niter": NITER, "default_lr_scheme": "CosineAnnealing", "warmup_iter": 2,
           "val_freq": 4},
    logger={"save_checkpoint_freq": 4},
)


def write_yaml(folder: Path, base: dict = SECTIONS, **sections) -> str:
    """The toy experiment (``base`` sections, then ``sections``) as ``folder/exp.yml``."""
    return dist_worker.write_yaml(folder, merge(toy_options(**base), sections))


def weights(run: Path, step: int, ema: bool = False) -> dict[str, torch.Tensor]:
    return dist_worker.saved_weights(run / "toy", step, ema=ema)


def logged(run: Path, tag: str) -> list[float]:
    return dist_worker.logged(run / "toy", tag)
