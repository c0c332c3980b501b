"""The DLAS Tortoise recipe itself: the seed `gpt.yml` (shared/seeds) with only its CHANGEME
values filled in validates, warns about the DLAS keys that mean nothing here, and trains for a
few steps on the CPU with a tiny filelist corpus, a tiny random DVAE and size overrides."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

import train
from helpers import REPO
from models import build_network
from utils.errors import run_command

SEED = REPO.parent / "shared" / "seeds" / "002_c6a6c1747f6b883e.txt"
MEL_NORMS = REPO.parent / "shared" / "golden" / "tortoise" / "mel_norms.pth"
TINY_GPT = {"layers": 2, "model_dim": 32, "heads": 2}
TINY_DVAE = {
    "channels": 80,
    "codebook_dim": 16,
    "hidden_dim": 16,
    "kernel_size": 3,
    "num_layers": 2,
    "num_resnet_blocks": 1,
    "num_tokens": 8192,
    "positional_dims": 1,
    "use_transposed_convs": False,
}
OVERRIDES = [
    *(f"networks.gpt.kwargs.{k}={v}" for k, v in TINY_GPT.items()),
    "datasets.train.batch_size=4",
    "datasets.train.n_workers=0",
    "datasets.val.batch_size=2",
    "datasets.val.n_workers=0",
    "train.niter=3",
]


def seed_yaml() -> str:
    """The ``gpt.yml`` of the seed notes, as a user copies it."""
    text = SEED.read_text()
    return re.search(r"## EXAMPLE yml file.*?```yml\n(.*?)```", text, re.S).group(1)


def filelist(folder, name, n):
    """A DLAS/ai-voice-cloning filelist (`wavs/x.wav|text`, paths relative to the list)."""
    (folder / "wavs").mkdir(parents=True, exist_ok=True)
    texts = ["Hello there, how are you?", "The sun rose early today.", "Bring me the red book."]
    lines = []
    for i in range(n):
        sr, seconds = 22050, 0.8 + 0.15 * i
        t = np.arange(int(sr * seconds)) / sr
        wav = sum(np.sin(2 * math.pi * (110 + 20 * i) * k * t) / k for k in range(1, 6))
        sf.write(folder / "wavs" / f"{name}{i}.wav", (0.2 * wav).astype(np.float32), sr)
        lines.append(f"wavs/{name}{i}.wav|{texts[i % len(texts)]}")
    path = folder / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def seed_run(tmp_path):
    """tmp/experiments/gpt.yml (the seed, CHANGEMEs filled) with everything it points at."""
    if not SEED.is_file():
        pytest.fail(f"the seed notes are missing: {SEED}")
    exp = tmp_path / "experiments"
    exp.mkdir()
    data = tmp_path / "data"
    text = seed_yaml()
    for placeholder, value in {
        "CHANGEME_your_experiment_name": "seed_gpt",
        "CHANGEME_training_dataset_name": "train",
        "CHANGEME_validation_dataset_name": "val",
        "CHANGEME_path_to_training_dataset": str(filelist(data, "train", 6)),
        "CHANGEME_path_to_validation_dataset": str(filelist(data, "val", 2)),
    }.items():
        text = text.replace(placeholder, value)
    assert "CHANGEME_" not in yaml.safe_dump(yaml.safe_load(text))  # every value filled in
    (exp / "gpt.yml").write_text(text)
    (exp / "clips_mel_norms.pth").write_bytes(MEL_NORMS.read_bytes())
    torch.manual_seed(0)
    dvae = build_network("lucidrains_dvae", TINY_DVAE)
    torch.save(dvae.state_dict(), exp / "dvae.pth")
    dvae_yml = {
        "networks": {
            "dvae": {"type": "generator", "which_model_G": "lucidrains_dvae", "kwargs": TINY_DVAE}
        },
        "path": {"pretrain_model_dvae": "../experiments/dvae.pth", "strict_load": True},
    }
    (exp / "train_diffusion_vocoder_22k_level.yml").write_text(yaml.safe_dump(dvae_yml))
    kwargs = yaml.safe_load(text)["networks"]["gpt"]["kwargs"] | TINY_GPT
    gpt = build_network("unified_voice2", kwargs)
    state = gpt.state_dict()
    for i in range(TINY_GPT["layers"]):  # as in the real autoregressive.pth
        n = sum(kwargs[k] for k in ("max_mel_tokens", "max_text_tokens", "max_conditioning_inputs"))
        n += 4  # GPT-2 positions: 1012 at the seed size
        state[f"gpt.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n, dtype=torch.bool))
        state[f"gpt.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, exp / "autoregressive.pth")
    return exp / "gpt.yml", gpt


def test_seed_gpt_yml_without_a_gpu_says_how_to_run_on_the_cpu(seed_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, _ = seed_run
    assert run_command(train.main, ["-opt", str(path), *_o(OVERRIDES), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "gpu_ids" in err and "-o device=cpu" in err and "Traceback" not in err


def test_seed_gpt_yml_validates_with_warnings_and_trains(seed_run, capsys, caplog):
    path, initial = seed_run
    argv = ["-opt", str(path), *_o([*OVERRIDES, "device=cpu"])]
    with caplog.at_level(logging.WARNING):
        assert run_command(train.main, [*argv, "--dry-run"]) == 0, capsys.readouterr().err
    warned = caplog.text
    for key in ("scale", "start_step", "loss_log_buffer", "eval.output_state", "eval.injectors"):
        assert f"{key}: DLAS option" in warned or f"'{key.split('.')[-1]}'" in warned, key
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_command(train.main, argv) == 0, capsys.readouterr().err
    assert "no step produces state key 'gen'" in caplog.text  # logger.visuals: [gen, mel]
    run = path.parent / "seed_gpt"
    weights = load_file(run / "models" / "3_gpt.safetensors")
    start = initial.state_dict()
    assert weights.keys() == start.keys()
    assert any(not torch.equal(weights[k], start[k]) for k in weights)  # it trained
    assert not any("dvae" in p.name for p in (run / "models").iterdir())  # never saved


def _o(assignments: list[str]) -> list[str]:
    return [a for kv in assignments for a in ("-o", kv)]
