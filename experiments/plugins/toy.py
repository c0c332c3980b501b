"""A tiny regression dataset and MLP, registered through ``plugins:`` (see toy_regression.yml).

This is how a user adds their own components: import the registries and decorate.
The tests use these too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from data import register_dataset
from models import register_model
from trainer.injectors import Injector
from utils.schema import Fraction, PositiveInt, Runtime


@register_dataset("toy_regression")
class ToyRegression(Dataset):
    """``y = x @ W + noise`` with fixed random ``W``; deterministic for a given ``seed``."""

    batch_keys = ("x", "y", "index")

    def __init__(
        self,
        num_items: int = 256,
        dim: int = 16,
        out_dim: int = 4,
        noise: float = 0.05,
        seed: int = 0,
        phase: Runtime[str] = "train",
    ) -> None:
        g = torch.Generator().manual_seed(seed + (0 if phase == "train" else 7919))
        w = torch.randn(dim, out_dim, generator=torch.Generator().manual_seed(seed))
        self.x = torch.randn(num_items, dim, generator=g)
        self.y = self.x @ w + noise * torch.randn(num_items, out_dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


@register_model("toy_mlp")
class ToyMLP(nn.Module):
    """An MLP with LayerNorm and dropout (dropout makes resume tests sensitive to RNG state)."""

    def __init__(
        self,
        in_dim: PositiveInt = 16,
        hidden: PositiveInt = 64,
        out_dim: PositiveInt = 4,
        depth: PositiveInt = 2,
        dropout: Fraction = 0.0,
        checkpointing: Runtime[bool] = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(depth):
            layers += [nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
            dim = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class AddNoiseInjector(Injector):
    """Adds Gaussian noise to ``in`` (an augmentation that uses the training RNG)."""

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std

    def forward(self, state: dict) -> dict:
        x = state[self.input]
        return {self.output: x + self.std * torch.randn_like(x)}
