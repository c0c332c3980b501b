"""What a checkpoint's training state holds: the parts the trainer registered, by name.

A part is anything with ``state_dict()`` and ``load_state_dict()``: the optimizers, LR
schedules, the engine (GradScaler), the loader position, EMA counts, the random streams of
every rank, the trainer's counters and every component that keeps state (e.g. an evaluator's
history). A checkpoint is exactly what was registered, under those names, plus a header
(format, step, seed, engine, world size, the experiment as loaded); nothing is read from the
trainer's attributes behind its back, so nothing is forgotten on resume.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from utils import distributed
from utils.seed import derive_seed, rng_state, set_rng_state, set_seed

log = logging.getLogger(__name__)
HEADER = ("format_version", "step", "seed", "engine_name", "world_size", "config")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class TrainingState:
    """The registered parts of a run's state."""

    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful) -> None:
        if name in self._parts or name in HEADER:
            raise ValueError(
                f"training state part {name!r} is registered twice or is a header "
                f"field ({', '.join(HEADER)})"
            )
        self._parts[name] = part

    def names(self) -> list[str]:
        return list(self._parts)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state (called on every rank: a part may gather from all of them)."""
        return {name: part.state_dict() for name, part in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore every registered part; one missing from ``state`` starts fresh, with a
        warning naming it."""
        state = upgrade(state)
        for name, part in self._parts.items():
            if name in state:
                part.load_state_dict(state[name])
            else:
                log.warning("%s has no saved state for %r; it starts fresh", source, name)


class Group:
    """Several stateful objects saved as one part ``{key: state}`` (optimizers per step ...)."""

    def __init__(self, members: dict[str, Stateful], what: str) -> None:
        self.members, self.what = members, what

    def state_dict(self) -> dict[str, Any]:
        return {k: m.state_dict() for k, m in self.members.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, member in self.members.items():
            if key in state:
                member.load_state_dict(state[key])
            else:
                log.warning(
                    "the checkpoint has no %s state for %r; it starts fresh", self.what, key
                )


class RandomStreams:
    """The random generators of every rank (python, numpy, torch, cuda)."""

    def __init__(self, dist: distributed.DistInfo, seed: int) -> None:
        self.dist, self.seed = dist, seed
        self.restored_step = 0

    def state_dict(self) -> list[dict[str, Any]]:
        return distributed.all_gather_object(rng_state())  # ranks draw different numbers

    def load_state_dict(self, per_rank: list[dict[str, Any]]) -> None:
        if len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
            return
        # another world size: rank 0 continues its stream, the others start new ones
        log.warning(
            "the checkpoint was written by %d rank(s), this run has %d: the data order "
            "and the random streams of ranks > 0 differ from an uninterrupted run",
            len(per_rank),
            self.dist.world_size,
        )
        set_rng_state(per_rank[0])
        if self.dist.rank > 0:
            set_seed(derive_seed(self.seed, self.dist.rank, self.restored_step))


class Counters:
    """The trainer's own counters besides the step (the step is in the header)."""

    def __init__(self) -> None:
        self.skipped_steps = 0  # updates skipped for a non-finite gradient, whole run
        self.oom_skipped = 0  # batches skipped because they ran out of memory, whole run

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "oom_skipped": self.oom_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.oom_skipped = int(state.get("oom_skipped", 0))  # 0 in older checkpoints


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A state file of an older format in today's layout."""
    if state.get("format_version", 1) >= 2:
        return state
    out = {
        k: v
        for k, v in state.items()
        if k in HEADER or k in ("optimizers", "schedulers", "engine", "loader")
    }
    out["ema"] = state.get("ema_n_averaged", {})
    out["rng"] = state.get("rng_per_rank") or [state["rng"]]
    out["counters"] = {"skipped_steps": state.get("skipped_steps", 0)}
    return out


# ------------------------------------------------------------------------- resume with changes
# What a param group's checkpoint may not decide: its parameters, and the lr (the schedule's
# value at the resumed position, from the YAML's base lr: see lr_scheduler.StepScheduler).
_NOT_HYPERPARAMETERS = ("params", "lr", "initial_lr")


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (weight decay, betas, eps, momentum ...)."""
    return [
        {k: copy.deepcopy(v) for k, v in g.items() if k not in _NOT_HYPERPARAMETERS}
        for g in optimizer.param_groups
    ]


def reapply_hyperparameters(
    optimizer: torch.optim.Optimizer, built: list[dict[str, Any]]
) -> dict[str, tuple[Any, Any]]:
    """Put back the hyperparameters the optimizer was built with (the YAML's) after loading a
    checkpoint overwrote them; returns ``{key: (checkpoint value, YAML value)}`` of those that
    differed (per group; the first group that differs names the change)."""
    changed: dict[str, tuple[Any, Any]] = {}
    for group, want in zip(optimizer.param_groups, built):
        for key, value in want.items():
            if key in group and group[key] != value:
                changed.setdefault(key, (group[key], value))
                group[key] = value
    return changed


def flatten(options: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": value}``; lists and scalars are leaves."""
    if not isinstance(options, dict) or not options:
        return {prefix: options} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in options.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def option_changes(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every option that differs between two experiments."""
    a, b = flatten(old), flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ignore):
            continue
        before, after = a.get(key, missing), b.get(key, missing)
        if before != after:
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: {show(before)} -> {show(after)}")
    return lines
