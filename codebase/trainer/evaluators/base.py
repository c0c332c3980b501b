"""The evaluator base class and its registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.component import Component
from utils.registry import Registry

EVALUATORS: Registry = Registry("evaluator")


class Evaluator(Component):
    """``evaluate(step)`` returns scalars logged under ``eval/<name>``.

    Runtime objects a subclass may declare as :class:`utils.schema.Runtime` constructor
    arguments: ``networks`` (the trainer's networks, EMA copies preferred), ``env``
    (:class:`trainer.component.TrainerEnv`), ``datasets`` (phase -> dataset), ``logger``
    (:class:`trainer.logger.TrainingLogger`) and ``steps`` (name -> the trainer's step, whose
    injectors make a network's inputs: :class:`trainer.evaluators.step_inputs.StepInputs`).
    An evaluator that keeps something across evaluations (e.g. the figures of earlier steps)
    defines ``state_dict()`` and ``load_state_dict()``; the trainer then saves it with each
    checkpoint.
    """

    abstract = True
    registry = EVALUATORS
    kind = "evaluator"

    def evaluate(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> Evaluator:
        """Evaluators have no training mode; here so the trainer can treat parts alike."""
        return self


def scalar_prefix(name: str, evaluators: int) -> str:
    """Where an evaluator's scalars are logged: ``eval/`` when the run has one evaluator,
    ``eval/<name>/`` when it has several (two ``tts_samples`` both return ``tf_loss_ar``)."""
    return "eval/" if evaluators <= 1 else f"eval/{name}/"


def check_network_and_dataset(
    what: str, network: str, dataset: str, networks: dict, datasets: dict
) -> None:
    """Raise ValueError when an evaluator names a network or dataset phase the run lacks."""
    if network not in networks:
        raise ValueError(
            f"{what}: no network {network!r}; the networks are {sorted(networks)} (set `network:`)"
        )
    if dataset not in datasets:
        raise ValueError(
            f"{what}: no dataset phase {dataset!r}; the datasets are "
            f"{sorted(datasets)} (add datasets.{dataset} or set `dataset:`)"
        )


class TrackedEvaluator(Evaluator):
    """An evaluator that keeps the figures of every evaluation (saved with each checkpoint, so a
    resumed run still compares with its first evaluation) and reports the first and the latest
    side by side. Subclasses append ``(step, scalars)`` to ``history`` in ``evaluate`` and list
    their rows in ``REPORT_ROWS``: ``(scalar, label)`` in the report's order."""

    abstract = True
    REPORT_ROWS: tuple[tuple[str, str], ...] = ()

    history: list[tuple[int, dict[str, float]]]

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[step, dict(scalars)] for step, scalars in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), dict(scalars)) for step, scalars in state["history"]]

    def samples_folder(self, step: int) -> Path | None:
        """Where the evaluation of ``step`` wrote its files (named in the report), if any."""
        return None

    def report(self) -> str:
        """The first and latest evaluation side by side, with what each figure means."""
        if not self.history:
            return f"{self.component_name}: no evaluation ran"
        (s0, first), (s1, last) = self.history[0], self.history[-1]
        lines = [f"{'':40} {'step ' + str(s0):>12} {'step ' + str(s1):>12}"]
        for key, label in self.REPORT_ROWS:
            if key in last:
                a = f"{first[key]:.3f}" if key in first else "-"
                lines.append(f"{label:40} {a:>12} {last[key]:>12.3f}")
        folder = self.samples_folder(s1)
        if folder is not None:
            lines.append(f"wavs and mel images of step {s1}: {folder}")
        return "\n".join(lines)
