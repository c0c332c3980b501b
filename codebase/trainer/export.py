"""Turn a run's checkpoint into what inference needs, in one folder.

    cd codebase && python -m trainer.export --run ../experiments/valle_demo \\
        --out ../exported/valle_demo [--step best|latest|N] [--net valle] \\
        [--weights ema|raw] [--dtype fp32|bf16|fp16] [--lora merge|separate] [--pth] [--force]

The folder gets ``<net>.safetensors`` (a network file with every metadata entry of its source:
which_model, kwargs, the phoneme vocabulary, phonemizer and codec, or Tortoise's tokenizer, mel
features and DVAE), optionally cast to half precision; for a LoRA network the adapters merged
into the base, or (``--lora separate``) ``<net>_lora.safetensors`` with its base file copied
next to it; ``--pth`` adds ``<net>.pth`` (Tortoise's key names, see :mod:`models.export`); and a
model card ``README.md`` (see :mod:`trainer.model_card`) with ``config.yml`` and a few sample
wavs. The checkpoint is verified (checksums) before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import models.audio.tts  # noqa: F401 - registers valle and unified_voice2
from models import load_network
from models.export import export_state_dict
from models.lora import find_base, load_adapted, read_adapters
from trainer.best import RECORD
from trainer.checkpoint import CheckpointManager
from trainer.model_card import model_card
from utils.errors import CheckpointError, UserError, run_command
from utils.io import (
    atomic_write,
    read_network_metadata,
    save_network,
    save_torch,
)
from utils.options import add_debug_flag, import_plugins
from utils.registry import did_you_mean

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLES = 3  # generated wavs copied into the card's samples/ (each with its reference)


@dataclass
class Source:
    """The checkpoint chosen for export and why."""

    run: Path
    step: int
    why: str  # "best eval/x 0.5 (min)" or "latest" or "asked for"
    best: dict | None  # best.json, when the run has one
    state: dict[str, Any]  # the verified training state of ``step``
    net: str
    ema: bool
    file: Path  # the network file, or the adapter file of a LoRA network
    lora: bool


# ----------------------------------------------------------------------------- choosing


def _files_of(checkpoints: CheckpointManager, step: int) -> dict[str, dict[tuple, Path]]:
    """``{net: {(ema, lora): path}}`` of the network files of ``step``."""
    name = re.compile(rf"^{step}_(?P<net>.+?)(?P<ema>_ema)?(?P<lora>_lora)?\.safetensors$")
    out: dict[str, dict[tuple, Path]] = {}
    for path in checkpoints.step_files(step):
        m = name.match(path.name) if path.parent == checkpoints.models_dir else None
        if m:
            out.setdefault(m["net"], {})[(bool(m["ema"]), bool(m["lora"]))] = path
    return out


def _pick_step(checkpoints: CheckpointManager, run: Path, step: str) -> tuple[int, str, dict]:
    """(step, why it was chosen, its verified state)."""
    steps = checkpoints.steps()
    if not steps:
        raise CheckpointError(
            f"{run} has no checkpoint (no {checkpoints.state_dir}/<step>.state); give the run "
            f"folder of a run that saved one (logger.save_checkpoint_freq, or the end of training)"
        )
    record = run / RECORD
    if step == "best" and record.is_file():
        best = json.loads(record.read_text())
        if best.get("step") is None:
            step = "latest"  # no finite figure was ever measured
        else:
            why = f"best {best['metric']} {best['value']:.5g} ({best['mode']}) in {record.name}"
            return int(best["step"]), why, _verified(checkpoints, int(best["step"]), steps)
    if step in ("best", "latest"):
        path, state, skipped = checkpoints.newest_intact()
        if path is None:
            raise CheckpointError(
                f"no checkpoint of {run} is intact:\n" + "\n".join(why for _, why in skipped)
            )
        for bad, why in skipped:
            log.warning("skipped %s: %s", bad, why)
        why = "latest intact checkpoint" + (" (the run has no best.json)" if step == "best" else "")
        return int(state["step"]), why, state
    if not step.isdigit():
        raise UserError(f"--step {step!r}: give best, latest or a step number")
    return int(step), "asked for (--step)", _verified(checkpoints, int(step), steps)


def _verified(checkpoints: CheckpointManager, step: int, steps: list[int]) -> dict:
    if step not in steps:
        raise CheckpointError(
            f"{checkpoints.root} has no checkpoint of step {step}; it has steps "
            f"{', '.join(map(str, steps))}"
        )
    return checkpoints.verify(checkpoints.state_path(step))


def choose(run: Path, step: str, net: str | None, weights: str | None) -> Source:
    """The checkpoint, network and weights to export (see the module docstring)."""
    if not run.is_dir():
        raise UserError(f"--run {run} is not a folder; give a run folder (experiments/<name>)")
    checkpoints = CheckpointManager(run)
    number, why, state = _pick_step(checkpoints, run, step)
    files = _files_of(checkpoints, number)
    if not files:
        raise CheckpointError(f"checkpoint {number} of {run} has no network file")
    if net is None:
        if len(files) > 1:
            raise UserError(f"{run} trains {len(files)} networks ({', '.join(files)}); pick --net")
        net = next(iter(files))
    elif net not in files:
        raise UserError(
            f"--net {net!r}: checkpoint {number} has no such network{did_you_mean(net, files)}; "
            f"it has {', '.join(files)}"
        )
    kinds = files[net]
    has_ema = any(ema for ema, _ in kinds)
    if weights == "ema" and not has_ema:
        raise UserError(
            f"--weights ema: network {net!r} has no EMA copy at step {number} (the run has no "
            f"ema_rate for it); use --weights raw"
        )
    ema = has_ema if weights is None else weights == "ema"
    lora = (ema, True) in kinds
    best = json.loads((run / RECORD).read_text()) if (run / RECORD).is_file() else None
    return Source(run, number, why, best, state, net, ema, kinds[(ema, lora)], lora)


# ----------------------------------------------------------------------------- writing


def _import_plugins(run: Path) -> None:
    """Register the run's own networks (``plugins:`` of its config.yml), best effort: a network
    that stays unknown fails later with the registry's message."""
    config = run / "config.yml"
    if not config.is_file():
        return
    plugins = (yaml.safe_load(config.read_text()) or {}).get("plugins") or []
    for base in (Path.cwd(), run):
        try:
            import_plugins(plugins, base)
            return
        except Exception as e:  # noqa: BLE001 - reported, and the load says what is missing
            log.debug("plugins %s relative to %s: %s", plugins, base, e)


def _cast(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters and buffers to ``dtype``; integer buffers stay as they are."""
    return net.to(dtype) if dtype != torch.float32 else net


def write_network(src: Source, out: Path, dtype: str, lora: str) -> tuple[list[Path], dict]:
    """Write the network file(s) into ``out``; returns them and the exported metadata."""
    if src.lora and lora == "separate":
        if dtype != "fp32":
            raise UserError(
                "--lora separate keeps the base file as it is (the adapters check its SHA-256), "
                "so it cannot be cast; use --dtype fp32 or --lora merge"
            )
        adapters = read_adapters(src.file)
        base = find_base(adapters)
        files = [out / f"{src.net}_lora.safetensors", out / base.name]
        shutil.copyfile(src.file, files[0])
        shutil.copyfile(base, files[1])
        return files, {**adapters.meta, "which_model": adapters.which_model}
    if src.lora:
        net, adapters = load_adapted(src.file)
        which, kwargs, extra = adapters.which_model, adapters.kwargs, dict(adapters.extra)
        extra["lora_merged"] = json.dumps(
            {"adapters": src.file.name, **dataclasses.asdict(adapters.options)}
        )
    else:
        meta = read_network_metadata(src.file)
        net = load_network(src.file)
        which, kwargs = meta["which_model"], meta["kwargs"]
        reserved = ("format", "format_version", "which_model", "kwargs", "sha256")
        extra = {k: v for k, v in meta.items() if k not in reserved}
    extra.update(dtype=str(DTYPES[dtype]).removeprefix("torch."), exported_from=str(src.file))
    path = out / f"{src.net}.safetensors"
    save_network(
        _cast(net.eval(), DTYPES[dtype]), path, which_model=which, kwargs=kwargs, extra=extra
    )
    return [path], {**extra, "which_model": which, "kwargs": kwargs}


def copy_samples(src: Source, out: Path) -> tuple[int | None, list[Path]]:
    """A few generated wavs (with their references) of ``step``'s evaluation, or of the
    nearest one before it, into ``out/samples``; (that step, the copies)."""
    folder = src.run / "samples"
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit() and p.is_dir()]
    steps = [s for s in steps if s <= src.step]
    if not steps:
        return None, []
    chosen = max(steps)
    wavs = sorted(p for p in (folder / str(chosen)).glob("*.wav") if not p.stem.endswith("_ref"))
    copies = []
    (out / "samples").mkdir(exist_ok=True)
    for wav in wavs[:SAMPLES]:
        for f in (wav, wav.with_name(f"{wav.stem}_ref.wav")):
            if f.is_file():
                shutil.copyfile(f, out / "samples" / f.name)
                copies.append(out / "samples" / f.name)
    return chosen, copies


def export(args: argparse.Namespace) -> Path:
    """Everything :func:`main` does; returns the card's path."""
    src = choose(args.run, args.step, args.net, args.weights)
    if args.pth and src.lora and args.lora == "separate":
        raise UserError("--pth needs a whole network: drop it, or use --lora merge")
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UserError(f"--out {out} exists and is not empty; choose another folder or --force")
    _import_plugins(src.run)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "samples", ignore_errors=True)
    files, meta = write_network(src, out, args.dtype, args.lora)
    if args.pth:
        state = export_state_dict(files[0], args.legacy_gpt2_buffers)
        files.append(out / f"{src.net}.pth")
        save_torch(state, files[-1], verify=True)
    config = src.run / "config.yml"
    if config.is_file():
        shutil.copyfile(config, out / "config.yml")
    sample_step, samples = copy_samples(src, out)
    card = model_card(
        src,
        out,
        files,
        meta,
        dtype=args.dtype,
        lora=args.lora,
        sample_step=sample_step,
        samples=samples,
        config=config if config.is_file() else None,
    )
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(card, encoding="utf-8"))
    for f in files:
        print(f"wrote {f} ({f.stat().st_size / 1e6:.2f} MB)")
    print(f"wrote {out / 'README.md'}: step {src.step}, {src.why}")
    return out / "README.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Export a run's checkpoint for inference: network file(s) and model card.",
    )
    p.add_argument("--run", required=True, type=Path, help="the run folder (experiments/<name>)")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (created)")
    p.add_argument(
        "--step",
        default="best",
        help="best (best.json; else latest), latest (newest intact) or a step number",
    )
    p.add_argument("--net", help="the network (default: the only one the run trains)")
    p.add_argument(
        "--weights", choices=("ema", "raw"), help="default: EMA when the run keeps it, else raw"
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="floating tensors")
    p.add_argument(
        "--lora",
        choices=("merge", "separate"),
        default="merge",
        help="a LoRA network: fold the adapters in, or keep them apart next to their base",
    )
    p.add_argument("--pth", action="store_true", help="also <net>.pth, a plain state dict")
    p.add_argument(
        "--legacy-gpt2-buffers",
        action="store_true",
        help="with --pth, unified_voice2: add the causal-mask buffers transformers < 4.31 saved",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    export(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
