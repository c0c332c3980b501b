"""Weighted losses over state keys. Each registers by snake_case class name minus ``_loss``.

YAML: ``losses.<name>: {type: mse, weight: 1.0, fake: pred, real: target}``. A weight of 0
computes and logs the loss without training on it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.component import Component, ComponentSpec
from utils.registry import Registry
from utils.schema import StateKey, state_key_options

LOSSES: Registry = Registry("loss")


class Loss(Component, nn.Module):
    """Reads state keys and returns a scalar. Common options: ``weight`` (default 1),
    ``after``/``before``/``every`` (step gates)."""

    abstract = True
    registry = LOSSES
    kind = "loss"

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        self.weight: float = spec.weight

    def forward(self, state: dict[str, Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def loss_input_keys(spec: Any) -> list[str]:
    """The state keys a validated loss spec reads (its :data:`StateKey` options)."""
    return state_key_options(spec.cls, spec.kwargs)


class DirectLoss(Loss):
    """A value the network computed itself (e.g. ``loss_ar``), averaged to a scalar."""

    def __init__(self, key: StateKey) -> None:
        super().__init__()
        self.key = key

    def forward(self, state: dict[str, Any]) -> torch.Tensor:
        return state[self.key].float().mean()


class CrossEntropyLoss(Loss):
    """Cross entropy of ``logits`` (classes on ``class_dim``) against integer ``labels``."""

    def __init__(
        self,
        logits: StateKey,
        labels: StateKey,
        class_dim: int = 1,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.logits, self.labels = logits, labels
        self.class_dim, self.ignore_index, self.label_smoothing = (
            class_dim,
            ignore_index,
            label_smoothing,
        )

    def forward(self, state: dict[str, Any]) -> torch.Tensor:
        logits = state[self.logits]
        if self.class_dim not in (1, 1 - logits.dim()):
            logits = logits.movedim(self.class_dim, 1)
        return F.cross_entropy(
            logits.float(),
            state[self.labels].long(),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


class PairLoss(Loss):
    """A distance between a prediction ``fake`` and a target ``real`` (both state keys)."""

    abstract = True
    distance = staticmethod(F.l1_loss)

    def __init__(self, fake: StateKey, real: StateKey) -> None:
        super().__init__()
        self.fake, self.real = fake, real

    def forward(self, state: dict[str, Any]) -> torch.Tensor:
        return self.distance(state[self.fake].float(), state[self.real].float())


class L1Loss(PairLoss):
    """Mean absolute error between ``fake`` and ``real``."""

    distance = staticmethod(F.l1_loss)


class MseLoss(PairLoss):
    """Mean squared error between ``fake`` and ``real``."""

    distance = staticmethod(F.mse_loss)
