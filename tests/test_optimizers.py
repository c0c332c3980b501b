"""Optimizer registry: weight-decay groups, DLAS option names, option and name errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.optimizers import OPTIMIZERS, build_optimizer, param_groups
from utils.registry import RegistryError
from utils.schema import Problems, bind_options


class Affine(nn.Module):
    """A custom layer whose bias is 2-d: exempt from decay by its name, not its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.zeros(1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class TinyLM(nn.Module):
    """Embedding, LayerNorm, biased layers, a bare 2-d weight and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.mix = nn.Parameter(torch.randn(4, 4))
        self.affine = Affine()
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(4, 4, bias=False)
        self.frozen.weight.requires_grad_(False)


def ids(params: list) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_split_decay_and_no_decay() -> None:
    m = TinyLM()
    groups = param_groups(m, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, keep = groups[0]["params"], groups[1]["params"]
    assert ids(decay) == {id(m.proj.weight), id(m.mix), id(m.affine.weight)}
    assert ids(keep) == {
        id(m.embed.weight),
        id(m.norm.weight),
        id(m.norm.bias),
        id(m.proj.bias),
        id(m.affine.bias),
        id(m.scale),
    }
    every = decay + keep
    assert len(every) == len(ids(every))  # the tied weight only once
    assert id(m.frozen.weight) not in ids(every)


def test_param_groups_norm_layers_and_empty_group() -> None:
    m = nn.Sequential(
        nn.BatchNorm1d(3), nn.GroupNorm(1, 3), nn.InstanceNorm1d(3, affine=True), nn.RMSNorm(3)
    )
    m[0].weight = nn.Parameter(torch.ones(3, 1))  # 2-d, exempt only because of the layer type
    groups = param_groups(m, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == len(list(m.parameters()))


def test_adamw_hyperparameters() -> None:
    opt = OPTIMIZERS.get("adamw")(
        module=TinyLM(), lr=3e-4, weight_decay=0.05, beta1=0.8, beta2=0.95, eps=1e-6
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6


def test_adam_default_has_no_decay() -> None:
    opt = build_optimizer("adam", TinyLM(), {"lr": 1e-3})
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_sgd_hyperparameters() -> None:
    opt = build_optimizer(
        "sgd", TinyLM(), {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    )
    assert isinstance(opt, torch.optim.SGD)
    decay = opt.param_groups[0]
    assert (
        decay["lr"],
        decay["momentum"],
        decay["nesterov"],
        decay["dampening"],
        decay["weight_decay"],
    ) == (0.1, 0.9, True, 0.0, 1e-4)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_yaml_options_are_checked_against_the_factory() -> None:
    problems = Problems()
    kwargs = bind_options(
        OPTIMIZERS.get("adamw"),
        {"lr": 1e-3, "weight_dacay": 0.1},
        "steps.g.optimizer_params",
        problems,
    )
    assert kwargs == {"lr": 1e-3}
    [(path, message)] = problems.items
    assert path == "steps.g.optimizer_params.weight_dacay"
    assert "did you mean 'weight_decay'" in message
    assert "module" not in message.split("valid options:")[1]  # runtime args are not options


def test_yaml_cannot_set_runtime_args_and_needs_lr() -> None:
    problems = Problems()
    bind_options(OPTIMIZERS.get("sgd"), {"module": "x"}, "p", problems)
    assert dict(problems.items) == {
        "p.module": "is set by the trainer and cannot be given in the YAML",
        "p.lr": "missing required option (float > 0)",
    }


def test_unknown_optimizer_lists_closest_names() -> None:
    with pytest.raises(RegistryError) as err:
        build_optimizer("adamww", TinyLM(), {"lr": 1e-3}, where="steps.gpt.optimizer")
    text = str(err.value)
    assert text.startswith("steps.gpt.optimizer: unknown optimizer 'adamww'")
    assert "did you mean 'adamw' or 'adam'?" in text
    assert "adam, adamw, sgd" in text
