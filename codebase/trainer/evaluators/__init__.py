"""Evaluators: run every ``eval.every`` steps (and on the ``eval`` command), return metrics.

Built-in evaluators live in sibling modules and register by snake_case class name minus
``_evaluator`` (``TtsSamplesEvaluator`` -> ``tts_samples``).
"""
from __future__ import annotations

from typing import ClassVar

from trainer.component import Component
from trainer.registry import Registry

EVALUATORS: Registry = Registry("evaluator")


class Evaluator(Component):
    """``evaluate(step)`` returns scalars logged under ``eval/<name>``.

    Runtime arguments a subclass may declare in ``runtime_args``: ``networks`` (the trainer's
    networks, EMA copies preferred), ``env`` (:class:`trainer.component.TrainerEnv`),
    ``datasets`` (phase -> dataset), ``logger`` (:class:`trainer.logger.TrainingLogger`).
    """

    abstract = True
    registry = EVALUATORS
    kind = "evaluator"
    runtime_args: ClassVar[tuple[str, ...]] = ()

    def evaluate(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


from trainer.evaluators import tts_samples  # noqa: E402,F401 - registers tts_samples
