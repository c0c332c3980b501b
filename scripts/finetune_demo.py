#!/usr/bin/env python
"""The fine-tuning demo: the offline demo's VALL-E learns a voice it never heard, by LoRA and by
full fine-tuning, and a table shows before and after side by side.

    cd codebase && python ../scripts/finetune_demo.py [--fresh] [--runs lora,full]
        [-o key=value ...] [--base-option key=value ...] [--no-base-training]

1. The base: the demo's trained model
   (``experiments/valle_demo/models/400_valle_ema.safetensors``). When it is missing the demo
   is trained first (``train.py -opt ../experiments/valle_demo.yml``, 10-18 min on 2 cores;
   ``--base-option`` overrides its options).
2. Each run (``experiments/valle_finetune_demo/<run>.yml``, ``lora`` and ``full``) is trained by
   ``train.py`` with the ``-o`` overrides; the first builds the new voice's corpus and data
   files. A run that already finished is reported, not retrained (``--fresh`` deletes the run
   folders first).
3. The table: the base model on the new voice's held-out sentences (step 0) and each run at its
   end: trainable parameters, the size of the file inference loads, wall time, then every
   figure of the runs' evaluators (held-out loss and accuracy, how close the outputs are to the
   new voice and to the old ones, the held-out loss on the old voices). Printed, and written to
   ``experiments/valle_finetune_demo/report.md`` with the figures in ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CODEBASE = REPO / "codebase"
sys.path.insert(0, str(CODEBASE))

from safetensors import safe_open  # noqa: E402

from trainer.checkpoint import CheckpointManager  # noqa: E402
from trainer.evaluators.tts_samples import TtsSamplesEvaluator  # noqa: E402

BASE_STEPS = 400  # valle_demo.yml's niter: its last EMA network is the base
FOLDER = "valle_finetune_demo"
RUN_LABELS = {"lora": "LoRA (rank 8)", "full": "full fine-tuning"}
ROWS = dict(TtsSamplesEvaluator.REPORT_ROWS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--experiments",
        type=Path,
        default=REPO / "experiments",
        help="folder of valle_demo.yml and valle_finetune_demo/ (default: the repo's)",
    )
    p.add_argument("--runs", default="lora,full", help="which runs, comma-separated")
    p.add_argument("--fresh", action="store_true", help="delete the runs' folders and retrain")
    p.add_argument(
        "-o",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option override for every fine-tuning run (train.py -o)",
    )
    p.add_argument(
        "--base-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option override for training the base when it is missing",
    )
    p.add_argument(
        "--no-base-training",
        action="store_true",
        help="stop with an error when the base is missing instead of training it",
    )
    return p.parse_args(argv)


def train(yml: Path, overrides: list[str]) -> float:
    """``train.py -opt yml`` from ``codebase/`` (output shown as it comes); its wall time."""
    args = [sys.executable, "train.py", "-opt", str(yml)]
    args += [a for o in overrides for a in ("-o", o)]
    print(f"$ cd codebase && python {' '.join(args[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=CODEBASE, env=os.environ.copy())
    if done.returncode:
        raise SystemExit(f"error: {yml.name} failed (exit {done.returncode}); see above")
    return time.perf_counter() - start


def base_model(experiments: Path, options: list[str], train_it: bool) -> Path:
    """The base network file, trained by the demo first when missing."""
    steps = next((o.split("=", 1)[1] for o in options if o.startswith("train.niter=")), None)
    base = experiments / "valle_demo" / "models" / f"{steps or BASE_STEPS}_valle_ema.safetensors"
    if base.is_file():
        return base
    demo = experiments / "valle_demo.yml"
    if not train_it:
        raise SystemExit(
            f"error: the base model {base} is missing; train the demo first: "
            f"cd codebase && python train.py -opt {demo} (10-18 min on 2 CPU cores)"
        )
    print(f"The base model {base} is missing: training the demo first (10-18 min on 2 cores).")
    train(demo, options)
    if not base.is_file():
        raise SystemExit(f"error: the demo finished but {base} is not there")
    return base


def finished(run_dir: Path) -> tuple[Path | None, dict | None]:
    """The run's newest intact training state and its contents, if any."""
    if not (run_dir / "training_state").is_dir():
        return None, None
    path, state, _ = CheckpointManager(run_dir).newest_intact()
    return path, state


def tensors(path: Path) -> int:
    """Parameters stored in a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not a dict


def inference_file(run_dir: Path, step: int) -> Path:
    """What synthesis loads of a run: its EMA network (adapters only for LoRA), else raw."""
    models = run_dir / "models"
    for name in ("valle_ema_lora", "valle_lora", "valle_ema", "valle"):
        if (models / f"{step}_{name}.safetensors").is_file():
            return models / f"{step}_{name}.safetensors"
    raise SystemExit(f"error: no network file of step {step} in {models}")


def trainable(run_dir: Path, step: int) -> int:
    """Trained parameters: the adapters of a LoRA run, the whole network otherwise."""
    models = run_dir / "models"
    lora = models / f"{step}_valle_lora.safetensors"
    return tensors(lora if lora.is_file() else models / f"{step}_valle.safetensors")


def summarize(run: str, run_dir: Path, wall: float | None) -> dict[str, Any]:
    path, state = finished(run_dir)
    if state is None:
        raise SystemExit(f"error: {run_dir} has no intact checkpoint; rerun with --fresh")
    step = int(state["step"])
    histories = {
        part.split(".", 1)[1]: value["history"]
        for part, value in state.items()
        if part.startswith("evaluator.") and isinstance(value, dict)
    }
    best = state.get("best") or {}
    file = inference_file(run_dir, step)
    return {
        "run": run,
        "run_dir": str(run_dir),
        "step": step,
        "trainable": trainable(run_dir, step),
        "file": str(file),
        "file_bytes": file.stat().st_size,
        "wall_seconds": wall,
        "best": {k: best.get(k) for k in ("metric", "step", "value") if k in best},
        "first": {name: h[0] for name, h in histories.items() if h},
        "last": {name: h[-1] for name, h in histories.items() if h},
    }


def table(runs: list[dict[str, Any]], base: Path) -> str:
    """Markdown: the base (step 0 of the first run) and each run's last evaluation."""
    head = ["", "before (base)"] + [RUN_LABELS.get(r["run"], r["run"]) for r in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, before: str, values: list[str]) -> None:
        lines.append("| " + " | ".join([label, before, *values]) + " |")

    full_params = tensors(base)
    row("trainable parameters", f"{full_params:,}", [f"{r['trainable']:,}" for r in runs])
    row(
        "file synthesis loads (MB)",
        f"{base.stat().st_size / 1e6:.2f}",
        [f"{r['file_bytes'] / 1e6:.2f}" for r in runs],
    )
    row(
        "wall time (s), evaluations included",
        "-",
        [f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "-" for r in runs],
    )
    row("steps", "0", [str(r["step"]) for r in runs])
    for evaluator, heading in (
        ("samples", "new voice, held-out sentences"),
        ("old_voices", "old voices (the base's held-out set)"),
    ):
        if evaluator not in runs[0]["first"]:
            continue
        lines.append(f"| **{heading}** |" + " |" * (len(head) - 1))
        before = runs[0]["first"][evaluator][1]
        for key, label in ROWS.items():
            if key not in before:
                continue
            after = [r["last"].get(evaluator, (0, {}))[1].get(key) for r in runs]
            row(
                label.strip(),
                f"{before[key]:.3f}",
                ["-" if v is None else f"{v:.3f}" for v in after],
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    experiments = a.experiments.resolve()
    folder = experiments / FOLDER
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    for run in runs:
        if not (folder / f"{run}.yml").is_file():
            raise SystemExit(f"error: no {folder / run}.yml (--runs names files of {folder})")
    base = base_model(experiments, a.base_option, not a.no_base_training)
    previous = folder / "report.json"
    walls = {}
    if previous.is_file() and not a.fresh:
        walls = {r["run"]: r["wall_seconds"] for r in json.loads(previous.read_text())["runs"]}
    results = []
    for run in runs:
        run_dir = folder / run
        if a.fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        path, state = finished(run_dir)
        done = state is not None and state.get("step") == _niter(state)
        if done:
            print(f"{run}: finished earlier at step {state['step']} ({path}); reporting it")
        else:
            # the base found above, whatever the YAML says (a -o of the user's still wins)
            overrides = [f"path.pretrain_model_valle={base}", *a.overrides]
            walls[run] = train(folder / f"{run}.yml", overrides)
        results.append(summarize(run, run_dir, walls.get(run)))
    text = table(results, base)
    report = (
        f"# Fine-tuning demo\n\nBase: `{base}`; runs: "
        + ", ".join(f"`{r['run_dir']}` (step {r['step']})" for r in results)
        + f"\n\n{text}\n"
    )
    (folder / "report.md").write_text(report, encoding="utf-8")
    previous.write_text(json.dumps({"base": str(base), "runs": results}, indent=1) + "\n")
    print("\n" + text + f"\n\nwritten to {folder / 'report.md'} (figures: {previous})")
    return 0


def _niter(state: dict[str, Any]) -> int | None:
    import yaml

    try:
        return int(yaml.safe_load(state["config"])["train"]["niter"])
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


if __name__ == "__main__":
    sys.exit(main())
