"""What a finished run prints: what it learned, and where its results are."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from models.lora import find_base, read_adapters
from trainer.best import RECORD
from utils.errors import UserError


def run_summary(trainer: Any) -> str:
    """Evaluator reports (first vs latest evaluation), then the run's folders and the commands
    to look at them: TensorBoard, and ``synthesize.py`` on the best checkpoint of
    ``train.best_metric`` (else the newest)."""
    lines = [f"step {trainer.step}; run folder {_show(trainer.run_dir)}"]
    stopped = getattr(trainer, "stopped_early", None)
    if stopped:
        lines.append(f"stopped early: {stopped}")
    for name, ev in trainer.evaluators.items():
        report = getattr(ev, "report", None)
        if callable(report):
            lines += ["", f"evaluator {name}:", report()]
    models = trainer.checkpoints.models_dir
    lines += [
        "",
        f"checkpoints:  {_show(models)}",
        f"TensorBoard:  tensorboard --logdir {_show(trainer.run_dir / 'tb_logger')}",
    ]
    best = getattr(trainer, "best", None)
    best_step = best.step if best is not None else None
    if best_step is not None:
        state = trainer.checkpoints.state_path(best_step)
        lines.insert(
            -1,
            f"best:         {best.metric} {best.value:.5g} ({best.mode}) at step {best_step}: "
            f"{_show(state)} (files in {_show(trainer.run_dir / RECORD)})",
        )
    model = _newest_network(models, best_step)
    prompt = _a_reference_wav(trainer.run_dir / "samples")
    if model is not None and prompt is not None:
        lines += [
            "synthesize:   python synthesize.py --model "
            + _model_arguments(model)
            + " --prompt "
            + _show(prompt)
            + " --text "
            + shlex.quote("The quick brown fox jumps over the lazy dog.")
            + " --out hello.wav"
        ]
    return "\n".join(lines)


def _model_arguments(model: Path) -> str:
    """``synthesize.py``'s model arguments for a network file: a LoRA adapter file goes with
    ``--lora`` after its base network file (recorded in the adapter's metadata)."""
    if not model.stem.endswith("_lora"):
        return _show(model)
    try:
        base = find_base(read_adapters(model))
    except UserError:  # the base is gone: the plain file, so synthesize.py says what is wrong
        return _show(model)
    return f"{_show(base)} --lora {_show(model)}"


def _newest_network(models: Path, step: int | None = None) -> Path | None:
    """The newest EMA network file (else the newest plain one) in a models folder, or of
    ``step`` when given and it has one."""
    files = sorted(models.glob("*.safetensors"), key=lambda p: (_step_of(p), "_ema" in p.stem))
    of_step = [p for p in files if _step_of(p) == step]
    files = of_step or files
    return files[-1] if files else None


def _step_of(path: Path) -> int:
    head = path.stem.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _a_reference_wav(samples: Path) -> Path | None:
    steps = sorted((p for p in samples.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    refs = sorted(steps[-1].glob("*_ref.wav")) if steps else []
    return refs[0] if refs else None


def _show(path: Path) -> str:
    """A path relative to the working directory when that is shorter, quoted for a shell."""
    path = Path(path).resolve()
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        rel = str(path)
    return shlex.quote(rel if len(rel) < len(str(path)) else str(path))
