"""Step-based learning-rate schedules, named as DLAS's ``train.default_lr_scheme``.

Each schedule is a :class:`~torch.optim.lr_scheduler.LambdaLR` whose factor is a pure function
of the number of completed optimizer steps, so a resumed run needs only ``last_epoch`` and
``base_lrs`` from the checkpoint to continue on exactly the same curve. The factor functions
are plain closures: ``LambdaLR.state_dict`` skips them, and they are rebuilt from the YAML.

Options are the factories' keyword arguments; ``optimizer`` and ``total_steps``
(``train.niter``) are passed by the trainer. ``scheduler.step()`` follows every
``optimizer.step()``.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from utils.registry import Registry
from utils.schema import Runtime, construct

SCHEDULERS: Registry[Callable[..., LambdaLR]] = Registry("lr scheduler")


class StepScheduler(LambdaLR):
    """A :class:`LambdaLR` whose resumed lr follows the YAML, not the checkpoint.

    A checkpoint gives only the position (``last_epoch``): the base lrs (the YAML's ``lr``)
    and the factor functions (the YAML's schedule) are the ones this scheduler was built with,
    so a changed lr or schedule takes effect on resume. The lr is written into the optimizer
    on load, so the load order of optimizer and scheduler does not matter.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        built = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.restored_base_lrs = list(self.base_lrs)  # what the checkpoint had, for the log
        self.base_lrs = built
        self._last_lr = [base * f(self.last_epoch) for base, f in zip(built, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, built, self._last_lr):
            group["initial_lr"], group["lr"] = base, lr


def _warmup(warmup_iter: int) -> Callable[[int], float]:
    """Linear warmup: factor (s + 1) / W after s < W completed steps; none if W <= 0."""
    if warmup_iter <= 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_iter)


def _build(
    optimizer: Optimizer,
    warmup_iter: int,
    main: Callable[[int], float] | list[Callable[[int], float]],
) -> StepScheduler:
    """A scheduler whose factor is warmup(step) * main(step) (``main`` may be per group)."""
    warm = _warmup(warmup_iter)
    mains = main if isinstance(main, list) else [main] * len(optimizer.param_groups)
    return StepScheduler(optimizer, [(lambda s, f=f: warm(s) * f(s)) for f in mains])


@SCHEDULERS.register("MultiStepLR")
def multi_step_lr(
    optimizer: Runtime[Optimizer],
    total_steps: Runtime[int],
    gen_lr_steps: list[int],
    lr_gamma: float = 0.5,
    warmup_iter: int = -1,
) -> StepScheduler:
    """Multiply the lr by ``lr_gamma`` at every milestone.

    gen_lr_steps: ascending step numbers (absolute, warmup included) after which the lr drops;
    lr_gamma: factor per milestone; warmup_iter: steps of linear warmup (<= 0: none).
    """
    milestones = list(gen_lr_steps)
    if milestones != sorted(milestones):
        raise ValueError(f"gen_lr_steps must be in ascending order, got {milestones}")
    if lr_gamma <= 0:
        raise ValueError(f"lr_gamma must be > 0, got {lr_gamma}")
    return _build(
        optimizer, warmup_iter, lambda step: lr_gamma ** bisect.bisect_right(milestones, step)
    )


@SCHEDULERS.register("CosineAnnealing")
def cosine_annealing(
    optimizer: Runtime[Optimizer],
    total_steps: Runtime[int],
    warmup_iter: int = -1,
    eta_min: float = 0.0,
    T_period: int | None = None,
) -> StepScheduler:
    """Cosine decay from the lr to ``eta_min`` after warmup, then constant at ``eta_min``.

    warmup_iter: steps of linear warmup (<= 0: none); eta_min: final lr (absolute, not a
    factor); T_period: length of the cosine in steps (default: total_steps - warmup_iter).
    """
    warmup = max(warmup_iter, 0)
    period = total_steps - warmup if T_period is None else T_period
    if period <= 0:
        raise ValueError(
            f"the cosine period must be > 0 steps, got {period} (T_period="
            f"{T_period}, total_steps={total_steps}, warmup_iter={warmup_iter})"
        )
    if eta_min < 0:
        raise ValueError(f"eta_min must be >= 0, got {eta_min}")

    def cosine(base_lr: float) -> Callable[[int], float]:
        # LambdaLR multiplies a factor into each group's lr; eta_min is absolute, so its factor
        # depends on the group (the lr at construction, as torch's CosineAnnealingLR).
        floor = eta_min / base_lr if base_lr > 0 else 0.0

        def factor(step: int) -> float:
            t = min(max(step - warmup, 0), period)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t / period))

        return factor

    bases = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    return _build(optimizer, warmup_iter, [cosine(b) for b in bases])


@SCHEDULERS.register("Constant")
def constant(
    optimizer: Runtime[Optimizer], total_steps: Runtime[int], warmup_iter: int = -1
) -> StepScheduler:
    """The lr unchanged after warmup.

    warmup_iter: steps of linear warmup (<= 0: none).
    """
    return _build(optimizer, warmup_iter, lambda step: 1.0)


def build_scheduler(
    name: str, optimizer: Optimizer, total_steps: int, options: dict, where: str = ""
) -> LambdaLR:
    """The schedule ``name`` for ``optimizer``; ``options`` were validated by ``bind_options``.

    ``where`` is the YAML path shown if ``name`` is unknown (``train.default_lr_scheme``).
    """
    return construct(
        SCHEDULERS.get(name, where),
        options,
        {"optimizer": optimizer, "total_steps": total_steps},
        where,
    )
