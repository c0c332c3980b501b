"""``python -m trainer.mel_norms``: a mel_norm_file from an experiment's dataset."""

from __future__ import annotations

import torch
import yaml

from helpers import build_from_yaml, make_corpus
from trainer.injectors import INJECTORS
from trainer.mel_norms import main
from utils.audio import load_audio, log_mel, mel_transform
from utils.errors import run_command


def experiment(tmp_path):
    make_corpus(tmp_path / "corpus", n=6)
    opt = {
        "name": "norms",
        "device": "cpu",
        "datasets": {
            "train": {
                "mode": "paired_voice_audio",
                "batch_size": 2,
                "path": "corpus/index.tsv",
                "fetcher_mode": ["tsv"],
                "sample_rate": 16000,
                "max_wav_length": 32000,
                "max_text_length": 50,
            }
        },
    }
    path = tmp_path / "exp.yml"
    path.write_text(yaml.safe_dump(opt))
    return path


def test_mel_norms_are_the_mean_log_mel_per_channel(tmp_path, capsys):
    exp = experiment(tmp_path)
    out = tmp_path / "clips_mel_norms.pth"
    assert run_command(main, ["-opt", str(exp), "--items", "500", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    norms = torch.load(out, weights_only=True)
    assert norms.shape == (80,) and norms.dtype == torch.float32

    # by hand: every frame of every clip, averaged per channel
    transform = mel_transform(16000)
    logs = [log_mel(transform(load_audio(tmp_path / "corpus" / f"u{i}.wav")[0].reshape(1, -1)))
            for i in range(6)]  # fmt: skip
    expected = torch.cat([m[0] for m in logs], dim=1).mean(1)
    assert torch.allclose(norms, expected, atol=1e-4)

    # the injector reads it as a mel_norm_file
    inj = build_from_yaml(
        INJECTORS,
        {"type": "torch_mel_spectrogram", "in": "w", "out": "m", "sampling_rate": 16000,
         "mel_norm_file": str(out)},
    )  # fmt: skip
    wav = load_audio(tmp_path / "corpus" / "u0.wav")[0].reshape(1, -1)
    assert torch.allclose(inj({"w": wav})["m"], logs[0] / norms[None, :, None], atol=1e-5)

    # fewer items: spread over the dataset, first and last included
    assert run_command(main, ["-opt", str(exp), "--items", "2", "--out", str(out)]) == 0
    two = torch.cat([logs[0][0], logs[5][0]], dim=1).mean(1)
    assert torch.allclose(torch.load(out, weights_only=True), two, atol=1e-4)


def test_mel_norms_errors(tmp_path, capsys):
    exp = experiment(tmp_path)
    out = tmp_path / "n.pth"
    assert run_command(main, ["-opt", str(exp), "--phase", "val", "--out", str(out)]) != 0
    assert "val" in capsys.readouterr().err
    assert run_command(main, ["-opt", str(exp), "--key", "audio", "--out", str(out)]) != 0
    assert "no 'audio'" in capsys.readouterr().err
    assert not out.exists()
