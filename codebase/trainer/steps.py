"""ConfigurableStep: injectors -> weighted losses -> backward over micro-batches -> step."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from data.loader import batch_size_of
from trainer.config import StepSpec
from trainer.injectors import Injector
from trainer.losses import Loss, loss_input_keys
from utils.registry import did_you_mean
from utils.schema import Problems


class ConfigurableStep:
    """One named step of the experiment: trains one network with one optimizer.

    Micro-batch losses are weighted by their share of the batch, so accumulating
    ``mega_batch_factor`` micro-batches gives the gradient of the full batch.
    """

    def __init__(
        self,
        name: str,
        spec: StepSpec,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        injectors: list[Injector],
        losses: list[Loss],
        engine: Any,
        group_labels: list[str] | None = None,
    ) -> None:
        self.name, self.spec, self.network = name, spec, network
        self.optimizer, self.injectors, self.losses, self.engine = (
            optimizer,
            injectors,
            losses,
            engine,
        )
        self.gate = spec.gate
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # the param_groups entry (or "rest") of each optimizer param group, for the lr logs
        self.group_labels = group_labels or ["rest"] * len(optimizer.param_groups)

    def run_injectors(self, state: dict[str, Any], step: int, training: bool) -> None:
        for inj in self.injectors:
            if not inj.runs(step, training):
                continue
            new = inj(state)
            clash = [k for k in new if k in state]
            if clash:
                raise KeyError(
                    f"{inj.path}: output {clash} would overwrite an existing state key;"
                    " choose another `out` name"
                )
            state.update(new)

    def compute_losses(
        self, state: dict[str, Any], step: int
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(weighted total or None, {"<name>": raw value}) for the losses whose gate is open."""
        total, logs = None, {}
        for loss in self.losses:
            if not loss.gate.open(step):
                continue
            value = loss(state)
            logs[loss.component_name] = value.detach()
            if loss.weight != 0:
                weighted = value if loss.weight == 1 else value * loss.weight
                total = weighted if total is None else total + weighted
        return total, logs

    def train(
        self, chunks: list[dict[str, Any]], step: int
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward/backward over the micro-batches, then one optimizer step.

        Returns the logs (``loss/<name>`` raw values, ``grad_norm/<step>``, ``_total``: the
        weighted sum) and whether the update was skipped for a non-finite gradient. Raises
        :class:`trainer.oom.BatchOutOfMemory` (on every rank) when a forward or backward ran
        out of memory, before the optimizer step.
        """
        n_items = sum(batch_size_of(c) for c in chunks)
        logs: dict[str, torch.Tensor] = {}
        total_loss = None
        for i, state in enumerate(chunks):
            share = batch_size_of(state) / n_items if len(chunks) > 1 else 1.0
            last = i == len(chunks) - 1
            part = f"step {self.name!r}" + (
                f" (micro-batch {i + 1} of {len(chunks)})" if len(chunks) > 1 else ""
            )
            with self.engine.no_sync(self.network, skip_sync=not last):
                with self.engine.oom_region(f"the forward of {part}"), self.engine.autocast():
                    self.run_injectors(state, step, training=True)
                    total, chunk_logs = self.compute_losses(state, step)
                if total is not None:
                    with self.engine.oom_region(f"the backward of {part}", syncs_gradients=last):
                        self.engine.backward(self.network, total * share if share != 1.0 else total)
                    total_loss = _accumulate(total_loss, total.detach(), share)
            for k, v in chunk_logs.items():
                logs[k] = _accumulate(logs.get(k), v, share)
        grad_norm, skipped = self.engine.step(
            self.network, self.optimizer, self.params, self.spec.clip_grad_eps
        )
        out = {f"loss/{k}": v for k, v in logs.items()}
        if total_loss is not None:
            out["_total"] = total_loss  # the trainer sums the steps' totals into loss/total
        out[f"grad_norm/{self.name}"] = grad_norm
        return out, skipped

    @torch.no_grad()
    def evaluate(self, state: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Injectors in eval mode and every loss (no gradients); raw loss values."""
        with self.engine.autocast():
            self.run_injectors(state, step, training=False)
            _, logs = self.compute_losses(state, step)
        return logs


def _accumulate(acc: torch.Tensor | None, value: torch.Tensor, share: float) -> torch.Tensor:
    value = value * share if share != 1.0 else value
    return value if acc is None else acc + value


def check_state_keys(
    steps: dict[str, StepSpec | None], batch_keys: Iterable[str], problems: Problems
) -> None:
    """Every injector input and loss key must come from the batch or an earlier injector, and
    no injector may overwrite a key; checked for training and for evaluation."""
    batch_keys = list(batch_keys)
    for training in (True, False):
        mode = "" if training else " (in eval mode)"
        available = set(batch_keys)
        seen_problem = set()
        for step in steps.values():
            if step is None:
                continue
            for inj in step.injectors:
                if not (inj.train if training else inj.eval):
                    continue
                for key in inj.inputs:
                    if key not in available and (inj.path, key) not in seen_problem:
                        seen_problem.add((inj.path, key))
                        problems.add(
                            f"{inj.path}.in", _missing_key(key, available, batch_keys, mode)
                        )
                for key in inj.outputs:
                    if key in available and (inj.path, "out", key) not in seen_problem:
                        seen_problem.add((inj.path, "out", key))
                        problems.add(
                            f"{inj.path}.out",
                            f"{key!r} already exists in the state"
                            f"{mode}; outputs may not overwrite a key",
                        )
                available.update(inj.outputs)
            for loss in step.losses:
                for key in loss_input_keys(loss):
                    if key not in available and (loss.path, key) not in seen_problem:
                        seen_problem.add((loss.path, key))
                        problems.add(loss.path, _missing_key(key, available, batch_keys, mode))


def _missing_key(key: str, available: set[str], batch_keys: list[str], mode: str) -> str:
    return (
        f"state key {key!r} is not in the batch ({', '.join(batch_keys)}) and no earlier "
        f"injector produces it{mode}{did_you_mean(key, available)}"
    )
