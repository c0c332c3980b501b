"""Learning-rate schedules: curve shapes, option checks and exact resume from state dicts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.lr_scheduler import SCHEDULERS, build_scheduler
from trainer.optimizers import build_optimizer
from utils.registry import RegistryError
from utils.schema import Problems, bind_options


def sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def curve(name: str, steps: int, lr: float = 1.0, total_steps: int = 100, **options) -> list[float]:
    """The lr used by each of the first ``steps`` optimizer steps."""
    opt = sgd(lr)
    sched = build_scheduler(name, opt, total_steps, options)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_linear_warmup() -> None:
    lrs = curve("Constant", 6, lr=2.0, warmup_iter=4)
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert curve("Constant", 3, warmup_iter=-1) == [1.0, 1.0, 1.0]
    assert curve("Constant", 3, warmup_iter=0) == [1.0, 1.0, 1.0]


def test_multistep_drops_exactly_at_milestones() -> None:
    lrs = curve("MultiStepLR", 9, gen_lr_steps=[3, 6], lr_gamma=0.5)
    assert lrs == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_multistep_with_warmup_uses_absolute_milestones() -> None:
    lrs = curve("MultiStepLR", 6, gen_lr_steps=[3], lr_gamma=0.1, warmup_iter=4)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 0.1, 0.1, 0.1])


def test_multistep_validates_options() -> None:
    with pytest.raises(ValueError, match="gen_lr_steps"):
        build_scheduler("MultiStepLR", sgd(), 10, {"gen_lr_steps": [6, 3]})
    with pytest.raises(ValueError, match="lr_gamma"):
        build_scheduler("MultiStepLR", sgd(), 10, {"gen_lr_steps": [3], "lr_gamma": 0.0})


def test_cosine_reaches_eta_min_at_the_end() -> None:
    total, warmup = 20, 4
    lrs = curve(
        "CosineAnnealing", total + 5, lr=1.0, total_steps=total, warmup_iter=warmup, eta_min=0.1
    )
    assert lrs[: warmup + 1] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(0.55)  # halfway between lr and eta_min
    assert all(a > b for a, b in zip(lrs[warmup:total], lrs[warmup + 1 : total + 1]))
    assert lrs[total:] == pytest.approx([0.1] * 5)  # stays at eta_min after the period


def test_cosine_eta_min_is_absolute_per_group() -> None:
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.1}])
    sched = build_scheduler("CosineAnnealing", opt, 10, {"eta_min": 0.01})
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.01, 0.01])


def test_cosine_period() -> None:
    lrs = curve("CosineAnnealing", 12, total_steps=100, T_period=10)
    expected = [0.5 * (1 + math.cos(math.pi * min(s, 10) / 10)) for s in range(12)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="period"):
        build_scheduler("CosineAnnealing", sgd(), 10, {"warmup_iter": 10})


def test_options_and_names_are_checked() -> None:
    problems = Problems()
    bind_options(SCHEDULERS.get("MultiStepLR"), {"gen_lr_step": [5]}, "train", problems)
    messages = dict(problems.items)
    assert "did you mean 'gen_lr_steps'" in messages["train.gen_lr_step"]
    assert "total_steps" not in messages["train.gen_lr_step"]
    assert "missing required option" in messages["train.gen_lr_steps"]
    with pytest.raises(RegistryError, match="did you mean 'CosineAnnealing'"):
        build_scheduler("CosineAnealing", sgd(), 10, {}, where="train.default_lr_scheme")


def test_load_state_dict_restores_lr() -> None:
    opt = sgd()
    sched = build_scheduler("MultiStepLR", opt, 20, {"gen_lr_steps": [2], "warmup_iter": 4})
    for _ in range(5):
        opt.step()
        sched.step()
    fresh_opt = sgd()
    fresh = build_scheduler("MultiStepLR", fresh_opt, 20, {"gen_lr_steps": [2], "warmup_iter": 4})
    fresh.load_state_dict(sched.state_dict())  # optimizer state deliberately not loaded
    assert fresh.last_epoch == 5
    assert fresh.get_last_lr() == sched.get_last_lr() == [0.5]
    assert fresh_opt.param_groups[0]["lr"] == 0.5


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: LambdaLR, steps: int) -> list[float]:
    """``steps`` real optimizer steps on a fixed regression; returns the lr of each."""
    gen = torch.Generator().manual_seed(sched.last_epoch)  # data depends only on the step
    lrs = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "name, options",
    [
        ("CosineAnnealing", {"warmup_iter": 5, "eta_min": 1e-4}),
        ("MultiStepLR", {"gen_lr_steps": [4, 10], "lr_gamma": 0.3, "warmup_iter": 3}),
    ],
)
def test_resume_matches_uninterrupted_run(name: str, options: dict) -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, LambdaLR]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
        opt = build_optimizer("adamw", model, {"lr": 1e-2, "weight_decay": 0.1})
        return model, opt, build_scheduler(name, opt, 20, options)

    model, opt, sched = build()
    straight = train(model, opt, sched, 7) + train(model, opt, sched, 13)

    model2, opt2, sched2 = build()
    resumed = train(model2, opt2, sched2, 7)
    state = copy.deepcopy(
        {"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}
    )
    model2, opt2, sched2 = build()  # as in a new process: everything rebuilt from the YAML
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    resumed += train(model2, opt2, sched2, 13)

    assert len(set(straight)) > 3  # the schedule really moves over the interval
    assert resumed == straight
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
