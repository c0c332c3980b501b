"""The best checkpoint of one metric, and early stopping when that metric stops improving.

``train.best_metric`` names a scalar the trainer measures at some steps: ``val/<loss>`` (from
validation) or ``eval/<scalar>`` (from an evaluator). :class:`BestTracker` compares each
measurement with the best so far. The trainer saves a checkpoint at every new best and keeps
it from pruning (``logger.keep_last`` keeps the newest N plus the best), writes ``best.json``
in the run folder, and stops once ``train.early_stop_patience`` measurements in a row have not
improved on the best. The tracker is a part of the training state, so a resumed run keeps the
same best and the same count of measurements without improvement.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from utils.io import atomic_write
from utils.registry import did_you_mean

log = logging.getLogger(__name__)
RECORD = "best.json"  # in the run folder: the best step, its value and its files


class BestTracker:
    """The best value of ``metric`` so far (lowest for mode ``min``, highest for ``max``), its
    step, and how many measurements since then did not improve on it."""

    def __init__(self, metric: str, mode: str, patience: int | None) -> None:
        self.metric, self.mode, self.patience = metric, mode, patience
        self.step: int | None = None  # the step of the best measurement
        self.value: float | None = None
        self.since = 0  # measurements after the best that did not improve on it
        self.last = -1  # the latest measured step: a step counts once (eval.at_start on resume)

    @property
    def exhausted(self) -> bool:
        """True when ``patience`` measurements in a row have not improved on the best."""
        return self.patience is not None and self.since >= self.patience

    def missing(self, step: int, results: dict[str, float], evaluated: bool) -> str | None:
        """Why ``eval/<x>`` cannot be tracked: the evaluators ran and never logged it (their
        scalar names are known only now); None when it was logged or is not an eval metric."""
        if not evaluated or not self.metric.startswith("eval/") or self.metric in results:
            return None
        if self.last >= 0:  # measured before: an evaluator may skip a figure now and then
            log.warning("%s was not logged at step %d; not counted", self.metric, step)
            return None
        logged = sorted(k for k in results if k.startswith("eval/"))
        return (
            f"{self.metric!r} is not among the scalars the evaluators logged at step "
            f"{step}{did_you_mean(self.metric, logged)}; they logged: "
            f"{', '.join(logged) or '(nothing)'}"
        )

    def observe(self, step: int, results: dict[str, float]) -> tuple[bool, str] | None:
        """Compare this step's figure with the best: (whether it is a new best, the log line);
        None when the metric was not measured (e.g. a gated loss) or this step already was.
        A non-finite figure is never the best."""
        value = results.get(self.metric)
        if value is None or step <= self.last:
            return None
        self.last = step
        value = float(value)
        better = math.isfinite(value) and (
            self.value is None or (value < self.value if self.mode == "min" else value > self.value)
        )
        if better:
            was = f" (was {self._best()})" if self.step is not None else ""
            self.step, self.value, self.since = step, value, 0
            return True, f"best {self.metric}: {value:.5g} at step {step}{was}"
        self.since += 1
        limit = f" of train.early_stop_patience {self.patience}" if self.patience else ""
        return False, (
            f"{self.metric} {value:.5g} at step {step}: no better than {self._best()} "
            f"({self.since}{limit} measurement(s) without improvement)"
        )

    def stop_message(self, step: int, state: Path | None, run_dir: Path) -> str:
        """The log line of an early stop: why, and where the best checkpoint (``state``, the
        best step's training state) is."""
        where = (
            f"{state} with its network files, listed in {run_dir / RECORD}"
            if state is not None
            else "none: no measurement was finite"
        )
        return (
            f"early stop at step {step}: {self.metric} has not improved for {self.since} "
            f"measurement(s) (train.early_stop_patience {self.patience}); the best, "
            f"{self._best()}, is {where}"
        )

    def _best(self) -> str:
        if self.step is None:
            return "no finite figure yet"
        return f"{self.value:.5g} at step {self.step}"

    def record(self, run_dir: Path, files: list[Path]) -> None:
        """Write ``<run_dir>/best.json``: the metric, mode, best step and value, and the files
        of its checkpoint (relative to the run folder)."""
        info = {
            "metric": self.metric,
            "mode": self.mode,
            "step": self.step,
            "value": self.value,
            "files": [str(Path(f).relative_to(run_dir)) for f in files],
        }
        text = json.dumps(info, indent=2) + "\n"
        atomic_write(run_dir / RECORD, lambda tmp: tmp.write_text(text))

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "step": self.step,
            "value": self.value,
            "since": self.since,
            "last": self.last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            if state["step"] is not None:
                log.warning(
                    "the checkpoint tracked the best %s (%s), this run tracks %s (%s): the "
                    "best starts over",
                    state["metric"],
                    state["mode"],
                    self.metric,
                    self.mode,
                )
            return
        self.step, self.value = state["step"], state["value"]
        self.since, self.last = int(state["since"]), int(state["last"])
