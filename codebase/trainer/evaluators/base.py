"""The evaluator base class and its registry."""

from __future__ import annotations

from trainer.component import Component
from utils.registry import Registry

EVALUATORS: Registry = Registry("evaluator")


class Evaluator(Component):
    """``evaluate(step)`` returns scalars logged under ``eval/<name>``.

    Runtime objects a subclass may declare as :class:`utils.schema.Runtime` constructor
    arguments: ``networks`` (the trainer's networks, EMA copies preferred), ``env``
    (:class:`trainer.component.TrainerEnv`), ``datasets`` (phase -> dataset) and ``logger``
    (:class:`trainer.logger.TrainingLogger`). An evaluator that keeps something across
    evaluations (e.g. the figures of earlier steps) defines ``state_dict()`` and
    ``load_state_dict()``; the trainer then saves it with each checkpoint.
    """

    abstract = True
    registry = EVALUATORS
    kind = "evaluator"

    def evaluate(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> Evaluator:
        """Evaluators have no training mode; here so the trainer can treat parts alike."""
        return self
