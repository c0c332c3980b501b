"""Shared test helpers: the toy experiment built in code, component building as the trainer
does it, a tiny made-up audio corpus, TensorBoard readers, and the launcher of
``dist_worker.py`` with readers of what its toy runs wrote.

Test modules import from here (``from helpers import ...``), never from each other.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.component import TrainerEnv, build_component
from trainer.config import INJECTOR_SHARED, LOSS_SHARED, validate_component, validate_experiment
from trainer.extensible_trainer import ExtensibleTrainer
from utils.options import options_from_dict
from utils.schema import Problems

REPO = Path(__file__).resolve().parents[1]
TOY_PLUGIN = str(REPO / "experiments" / "plugins" / "toy.py")
DIST_WORKER = Path(__file__).with_name("dist_worker.py")


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` as a module (once), for tests of what a script computes."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


# ----------------------------------------------------------------------------- toy experiment
def toy_options(**sections: Any) -> dict:
    """A complete, valid toy experiment; keyword arguments replace or deep-merge sections."""
    opt = {
        "name": "toy",
        "seed": 7,
        "device": "cpu",
        "plugins": [TOY_PLUGIN],
        "datasets": {"train": {"mode": "toy_regression", "batch_size": 8, "num_items": 64}},
        "networks": {
            "mlp": {"type": "generator", "which_model_G": "toy_mlp", "kwargs": {"hidden": 32}}
        },
        "steps": {
            "fit": {
                "training": "mlp",
                "optimizer": "adamw",
                "optimizer_params": {"lr": 1e-2},
                "injectors": {
                    "pred": {"type": "generator", "generator": "mlp", "in": "x", "out": "pred"}
                },
                "losses": {"mse": {"type": "mse", "weight": 1.0, "fake": "pred", "real": "y"}},
            }
        },
        "train": {"niter": 5},
        "logger": {"print_freq": 1, "progress_bar": False, "stdin_commands": False},
    }
    return merge(opt, sections)


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_replace"):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = {kk: copy.deepcopy(vv) for kk, vv in v.items() if kk != "_replace"}
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_experiment(tmp_path: Path, **sections: Any):

    return validate_experiment(options_from_dict(toy_options(**sections), tmp_path))


def make_trainer(tmp_path: Path, **sections: Any):

    return ExtensibleTrainer(make_experiment(tmp_path, **sections))


# ----------------------------------------------------------------------------- components
def build_from_yaml(
    registry,
    options: dict,
    provided: dict | None = None,
    base_dir: Path | None = None,
    path: str = "steps.s.x",
):
    """Validate YAML-style component options as the trainer does, then build the component
    with the runtime objects in ``provided`` (an ``env`` on the CPU by default)."""
    problems = Problems()
    shared = tuple(dict.fromkeys(INJECTOR_SHARED + LOSS_SHARED))
    spec = validate_component(registry, options, path, "x", problems, base_dir or Path("."), shared)
    assert not problems, problems.items
    provided = dict(provided or {})
    provided.setdefault(
        "env", TrainerEnv(device=torch.device("cpu"), run_dir=base_dir or Path("."))
    )
    return build_component(spec, provided)


def build(registry, options, provided=None, path="steps.s.x"):
    return build_from_yaml(registry, options, provided, path=path)


# ----------------------------------------------------------------------------- audio corpus
TEXTS = [
    "the cat sat down",
    "a dog ran home",
    "she sells sea shells",
    "we went out again",
    "it is very cold today",
    "bring me the red book",
    "open the door slowly",
    "time flies like an arrow",
]


def make_corpus(root, n=8, extra=()):
    """Harmonic tones (different pitch per speaker) with a TSV index."""

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        speaker = f"spk{i % 2}"
        sr = 16000
        t = np.arange(int(sr * (0.6 + 0.1 * i))) / sr
        f0 = 120 if speaker == "spk0" else 210
        wav = sum(np.sin(2 * math.pi * f0 * k * t * (1 + 0.2 * t)) / k for k in range(1, 6))
        sf.write(root / f"u{i}.wav", (0.2 * wav).astype(np.float32), sr)
        lines.append(f"u{i}.wav\t{TEXTS[i % len(TEXTS)]}\t{speaker}")
    lines += list(extra)
    (root / "index.tsv").write_text("\n".join(lines) + "\n")
    return root / "index.tsv"


# ----------------------------------------------------------------------------- run folders
def tb_scalars(run_dir):
    """Every TensorBoard scalar of ``<run_dir>/tb_logger``: {tag: [(step, value), ...]}."""

    acc = EventAccumulator(str(run_dir / "tb_logger"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------- toy runs under dist_worker.py
NITER = 8
# 40 items, global batch 8: 5 steps per epoch, so the run crosses a reshuffle. No dropout,
# fp32; clipping and a schedule so that more than the plain gradient has to agree.
SECTIONS = dict(
    datasets={
        "train": {"batch_size": 8, "num_items": 40},
        "val": {"mode": "toy_regression", "batch_size": 8, "num_items": 16},
    },
    steps={"fit": {"clip_grad_eps": 0.5}},
    train={"niter": NITER, "default_lr_scheme": "CosineAnnealing", "warmup_iter": 2, "val_freq": 4},
    logger={"save_checkpoint_freq": 4},
)


def write_yaml(folder: Path, base: dict = SECTIONS, **sections) -> str:
    """The toy experiment (``base`` sections, then ``sections``) as ``folder/exp.yml``; the run
    folder becomes ``folder/toy``."""

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.yml"
    path.write_text(yaml.safe_dump(merge(toy_options(**base), sections)))
    return str(path)


def weights(run: Path, step: int, ema: bool = False, net: str = "mlp") -> dict:
    """The tensors of ``<run>/toy/models/<step>_<net>[_ema].safetensors``."""

    return load_file(run / "toy" / "models" / f"{step}_{net}{'_ema' if ema else ''}.safetensors")


def logged(run: Path, tag: str) -> list[float]:
    """Every value of TensorBoard scalar ``tag`` of the toy run in ``run``."""
    return [v for _, v in tb_scalars(run / "toy")[tag]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    runs: list[list[str] | dict],
    workdir: Path,
    nproc: int | None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run each of ``runs`` (train.py argument lists, or ``{"argv": [...], "kill_at": N}``; see
    dist_worker.py) in ``nproc`` processes under torchrun, or in one plain ``python`` process
    (no launcher) when ``nproc`` is None. Sets PYTHONPATH so that ``codebase/`` is importable.
    A failed launch raises with its output, unless ``check`` is false."""
    spec = workdir / "runs.json"
    spec.write_text(json.dumps(runs))
    launcher = (
        []
        if nproc is None
        else [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    )
    cmd = [sys.executable, *launcher, str(DIST_WORKER), str(spec)]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "codebase"), str(REPO / "tests")]),
        **(env or {}),
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a parent job's variables would confuse torchrun
    out = subprocess.run(
        cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({out.returncode}):\n"
            f"{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
        )
    return out


# ----------------------------------------------------------------------------- synthesis
# Architecture of the random mel_rvq codec the model's codes belong to (16 kHz, 50 frames/s).
CODEC_ARCH = {"n_levels": 2, "codebook_size": 16, "n_mels": 40, "hop_length": 320}
TINY = {
    "n_phonemes": 64,
    "codebook_size": 16,
    "n_levels": 2,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "ff_mult": 2,
    "dropout": 0.0,
    "max_positions": 512,
}
SYNTH_OPTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


def write_checkpoint(path, **extra_override):
    """A tiny random VALL-E network file with the metadata synthesis reads; ``extra_override``
    replaces metadata entries (None drops one)."""
    from data.audio.phonemes import PhonemeVocab, Phonemizer
    from models.audio.tts.valle import VALLE
    from utils.io import save_network

    torch.manual_seed(0)
    model = VALLE(**TINY)
    phonemizer = Phonemizer()
    vocab = PhonemeVocab.build(phonemizer.phonemize_symbols(TEXTS))
    extra = {
        "phoneme_vocab": vocab.to_json(),
        "phonemizer": json.dumps(phonemizer.config()),
        # a fitted codec file that is not on this machine: tests override `pretrained`
        "codec": json.dumps(
            {
                "name": "mel_rvq",
                "checkpoint": str(path.parent / "gone.st"),
                "pretrained": True,
                **CODEC_ARCH,
            }
        ),
    }
    extra.update(extra_override)
    save_network(
        model,
        path,
        which_model="valle",
        kwargs=TINY,
        extra={k: v for k, v in extra.items() if v is not None},
    )
    return model


def write_prompt(path, seconds=1.5, sr=22050):
    """A harmonic tone at another rate than the codec's, so loading must resample."""
    t = np.arange(int(sr * seconds)) / sr
    wav = sum(np.sin(2 * math.pi * 150 * k * t) / k for k in range(1, 5))
    sf.write(path, (0.2 * wav).astype(np.float32), sr)
    return path
