"""Evaluators: run every ``eval.every`` steps (and on the ``eval`` command), return metrics.

Built-in evaluators live in sibling modules and register by snake_case class name minus
``_evaluator`` (``TtsSamplesEvaluator`` -> ``tts_samples``).
"""

from trainer.evaluators import (  # noqa: F401 - registers them
    dvae_reconstruction,
    tortoise_samples,
    tts_samples,
)
from trainer.evaluators.base import EVALUATORS, Evaluator

__all__ = ["EVALUATORS", "Evaluator"]
