"""Optimizers, found by name from a step's ``optimizer`` / ``optimizer_params`` in the YAML.

A factory's keyword arguments are its YAML options (DLAS spelling); ``module``, the network
being trained, is a :class:`~utils.schema.Runtime` argument the trainer passes. Weight decay
is applied only where it regularises: see :func:`param_groups`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import batchnorm, instancenorm, normalization

from utils.registry import Registry
from utils.schema import PositiveFloat, Runtime, construct

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


def _classes_of(*modules: object) -> tuple[type, ...]:
    return tuple(
        c
        for m in modules
        for _, c in inspect.getmembers(m, inspect.isclass)
        if issubclass(c, nn.Module) and c.__module__ == m.__name__
    )


# Every torch normalisation layer (LayerNorm, GroupNorm, RMSNorm, BatchNorm*, InstanceNorm* ...),
# collected from their modules so that new ones are covered without a list to maintain.
NO_DECAY_MODULES: tuple[type, ...] = _classes_of(normalization, batchnorm, instancenorm) + (
    nn.Embedding,
    nn.EmbeddingBag,
)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group and a ``weight_decay=0`` group.

    Biases, normalisation and embedding parameters and anything with fewer than 2 dimensions
    are not decayed: shrinking them towards zero does not regularise, it only distorts scale.
    A shared (tied) parameter appears once, undecayed if any of its owners says so (a tied
    embedding / output head stays undecayed, as in GPT-2). Empty groups are left out.
    """
    no_decay: set[int] = set()
    for sub in module.modules():
        exempt = isinstance(sub, NO_DECAY_MODULES)
        for name, p in sub.named_parameters(recurse=False):
            if exempt or name.endswith("bias") or p.ndim < 2:
                no_decay.add(id(p))
    decay, keep = [], []
    for p in module.parameters():  # deduplicates tied parameters, in a stable order
        if p.requires_grad:
            (keep if id(p) in no_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@OPTIMIZERS.register("adamw")
def adamw(
    module: Runtime[nn.Module],
    lr: PositiveFloat,
    weight_decay: float = 0.01,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay).

    lr: learning rate; weight_decay: decoupled decay of weight matrices; beta1, beta2: decay
    rates of the gradient's running mean and squared mean; eps: added to the denominator.
    """
    return torch.optim.AdamW(
        param_groups(module, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps
    )


@OPTIMIZERS.register("adam")
def adam(
    module: Runtime[nn.Module],
    lr: PositiveFloat,
    weight_decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.optim.Adam:
    """Adam (weight decay as L2 penalty added to the gradient).

    lr: learning rate; weight_decay: L2 penalty on weight matrices; beta1, beta2: decay rates
    of the gradient's running mean and squared mean; eps: added to the denominator.
    """
    return torch.optim.Adam(
        param_groups(module, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps
    )


@OPTIMIZERS.register("sgd")
def sgd(
    module: Runtime[nn.Module],
    lr: PositiveFloat,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    dampening: float = 0.0,
) -> torch.optim.SGD:
    """Stochastic gradient descent.

    lr: learning rate; momentum: momentum factor; weight_decay: L2 penalty on weight matrices;
    nesterov: Nesterov momentum (needs momentum > 0 and dampening 0); dampening: damping of
    the momentum's gradient term.
    """
    return torch.optim.SGD(
        param_groups(module, weight_decay),
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        dampening=dampening,
    )


def build_optimizer(
    name: str, module: nn.Module, options: dict, where: str = ""
) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``module``; ``options`` were validated by ``bind_options``.

    ``where`` is the YAML path shown if ``name`` is unknown (``steps.gpt.optimizer``).
    """
    return construct(OPTIMIZERS.get(name, where), options, {"module": module}, where)
