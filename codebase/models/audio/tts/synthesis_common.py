"""What both synthesizers share: their errors and the sampling option checks."""

from __future__ import annotations

from utils.errors import CheckpointError, DataError, UserError

# Longest output per text: 10 minutes. An autoregressive model this long is far beyond what it
# was trained on, and the buffers grow with it (1e9 s asked for ~200 GB at once).
MAX_DURATION_CAP = 600.0


class SynthesisError(UserError, ValueError):
    """Inputs synthesis cannot use: a text, a prompt or an option; the message says which."""


class NotASynthesisCheckpoint(CheckpointError, ValueError):
    """A network file synthesis cannot use: missing, corrupt, or not a VALL-E saved here."""


class EmptyPrompt(DataError, ValueError):
    """A voice prompt with no audio in it."""


def sampling_problems(
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    nar_temperature: float = 0.0,
    max_duration: float = 20.0,
) -> list[tuple[str, str]]:
    """``(option, what is wrong)`` for each sampling option out of its range (empty: all fine).

    NaN fails every range, so it is reported too."""
    checks = [
        ("temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
        ("top_k", top_k, top_k >= 0, ">= 0 (0: off)"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1] (1: off)"),
        ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0 (1: off)"),
        ("nar_temperature", nar_temperature, nar_temperature >= 0, ">= 0 (0: greedy)"),
        (
            "max_duration",
            max_duration,
            0 < max_duration <= MAX_DURATION_CAP,
            f"in (0, {MAX_DURATION_CAP:g}] seconds",
        ),
    ]
    return [(name, f"must be {rule}, got {value}") for name, value, ok, rule in checks if not ok]
