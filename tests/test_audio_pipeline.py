"""The audio pipeline inside experiments: prepare CLI, hdf5_codes training, on-the-fly codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TEXTS, make_corpus
from trainer.config import validate_experiment
from trainer.extensible_trainer import ExtensibleTrainer
from utils.options import load_options
from utils.schema import ConfigError

PLUGIN = str(Path(__file__).with_name("audio_plugin.py"))
CODEC = {"n_levels": 2, "codebook_size": 16, "n_mels": 40, "hop_length": 320}


def h5_experiment(tmp_path, **train):
    make_corpus(tmp_path / "corpus", n=8)
    opt = {
        "name": "codes",
        "seed": 3,
        "device": "cpu",
        "plugins": [PLUGIN],
        "datasets": {
            "train": {
                "mode": "hdf5_codes",
                "path": "data/data.h5",
                "max_tokens": 400,
                "prompt_frames": 8,
                "prepare": {
                    "fetcher_mode": "tsv",
                    "path": "corpus/index.tsv",
                    "codec": "mel_rvq",
                    "codec_options": CODEC,
                    "fit_iters": 3,
                },
            }
        },
        "networks": {"lm": {"which_model_G": "toy_code_lm", "kwargs": {"codebook_size": 16}}},
        "steps": {
            "fit": {
                "training": "lm",
                "optimizer_params": {"lr": 1e-2},
                "injectors": {
                    "fwd": {
                        "type": "generator",
                        "generator": "lm",
                        "in": ["codes", "code_lengths", "phonemes"],
                        "out": "loss",
                    }
                },
                "losses": {"ce": {"type": "direct", "key": "loss"}},
            }
        },
        "train": {"niter": 4, **train},
        "logger": {"print_freq": 1, "progress_bar": False, "stdin_commands": False},
    }
    path = tmp_path / "exp.yml"
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def test_prepare_section_is_validated(tmp_path):
    path = h5_experiment(tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_experiment(
            load_options(
                path,
                [
                    "datasets.train.prepare.fetcher_mod=tsv",
                    "datasets.train.prepare.codec_options.hop=3",
                ],
            )
        )
    problems = dict(e.value.problems)
    assert "did you mean 'fetcher_mode'" in problems["datasets.train.prepare.fetcher_mod"]
    with pytest.raises(ConfigError) as e:  # the names inside prepare: too, file or not
        validate_experiment(
            load_options(
                path,
                [
                    "datasets.train.prepare.fetcher_mode=tsvv",
                    "datasets.train.prepare.codec=mel_rvk",
                    "datasets.train.prepare.language=englsh",
                ],
            )
        )
    problems = dict(e.value.problems)
    assert "did you mean 'tsv'" in problems["datasets.train.prepare.fetcher_mode"]
    assert "did you mean 'mel_rvq'" in problems["datasets.train.prepare.codec"]
    assert "unknown espeak language 'englsh'" in problems["datasets.train.prepare.language"]
    with pytest.raises(ConfigError) as e:
        validate_experiment(load_options(path, ["datasets.train.prepare.codec_options.hop=3"]))
    problems = dict(e.value.problems)
    hop = problems["datasets.train.prepare.codec_options.hop"]
    assert hop.startswith("unknown option") and "hop_length" in hop
    exp = validate_experiment(load_options(path))
    prep = exp.datasets["train"].kwargs["prepare"]
    assert prep.path == tmp_path.resolve() / "corpus" / "index.tsv"  # relative to the YAML
    assert exp.datasets["train"].kwargs["path"] == tmp_path.resolve() / "data" / "data.h5"


@pytest.mark.slow
def test_prepare_cli_then_training_resumes_sampler_position(tmp_path):
    path = h5_experiment(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "data.audio.prepare", "-opt", str(path)],
        cwd=REPO / "codebase",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "8 item(s) added" in r.stdout and (tmp_path / "data" / "data.h5").is_file()

    trainer = ExtensibleTrainer(validate_experiment(load_options(path)))
    losses = {}
    trainer.step_callbacks.append(lambda s, logs: losses.__setitem__(s, logs["loss/ce"].item()))
    trainer.train()
    assert len(losses) == 4 and all(v > 0 for v in losses.values())
    state = trainer.checkpoints.load_state(trainer.checkpoints.latest())
    assert state["loader"] == trainer.loader.state_dict()
    assert trainer.loader.epoch * len(trainer.loader) + trainer.loader.batches_done == 4


def test_training_prepares_missing_data_file(tmp_path):
    path = h5_experiment(tmp_path, niter=1)
    ExtensibleTrainer(validate_experiment(load_options(path))).train()
    assert (tmp_path / "data" / "data.h5").is_file()


def test_on_the_fly_codes_and_phonemes(tmp_path):
    """The DLAS pattern: raw wav + text in the batch, codes and phoneme ids made by injectors."""
    from data.audio.phonemes import PhonemeVocab, Phonemizer
    from models.audio.codecs.mel_rvq import MelRVQCodec
    from utils.audio import load_audio

    tsv = make_corpus(tmp_path / "corpus", n=6)
    wavs = [load_audio(p, 16000)[0] for p in sorted((tmp_path / "corpus").glob("u*.wav"))]
    MelRVQCodec.fit(wavs, tmp_path / "codec.safetensors", iters=3, **CODEC)
    PhonemeVocab.build(Phonemizer().phonemize_symbols(TEXTS)).save(tmp_path / "vocab.json")
    opt = {
        "name": "fly",
        "seed": 1,
        "device": "cpu",
        "plugins": [PLUGIN],
        "datasets": {
            "train": {
                "mode": "paired_voice_audio",
                "path": str(tsv),
                "fetcher_mode": "tsv",
                "sample_rate": 16000,
                "batch_size": 3,
            }
        },
        "networks": {"lm": {"which_model_G": "toy_code_lm", "kwargs": {"codebook_size": 16}}},
        "steps": {
            "fit": {
                "training": "lm",
                "optimizer_params": {"lr": 1e-2},
                "injectors": {
                    "crop": {
                        "type": "random_audio_crop",
                        "crop_size": 8000,
                        "in": ["wav", "wav_lengths"],
                        "out": ["wav_crop", "crop_lengths"],
                    },
                    "to_codes": {
                        "type": "audio_to_codes",
                        "codec": "mel_rvq",
                        "codec_options": {"checkpoint": "codec.safetensors"},
                        "in": ["wav_crop", "crop_lengths"],
                        "out": ["codes", "code_lengths"],
                    },
                    "to_phonemes": {
                        "type": "phonemize",
                        "vocab_file": "vocab.json",
                        "in": "text",
                        "out": ["phonemes", "phoneme_lengths"],
                    },
                    "fwd": {
                        "type": "generator",
                        "generator": "lm",
                        "in": ["codes", "code_lengths", "phonemes"],
                        "out": "loss",
                    },
                },
                "losses": {"ce": {"type": "direct", "key": "loss"}},
            }
        },
        "train": {"niter": 2},
        "logger": {"print_freq": 1, "progress_bar": False, "stdin_commands": False},
    }
    path = tmp_path / "fly.yml"
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    trainer = ExtensibleTrainer(validate_experiment(load_options(path)))
    seen = {}
    trainer.step_callbacks.append(lambda s, logs: seen.__setitem__(s, logs["loss/ce"].item()))
    trainer.train()
    assert len(seen) == 2 and all(v > 0 for v in seen.values())


def test_checkpoints_carry_vocab_phonemizer_and_codec(tmp_path):
    import json

    from utils.io import read_network_metadata

    path = h5_experiment(tmp_path, niter=1)
    trainer = ExtensibleTrainer(validate_experiment(load_options(path)))
    trainer.train()
    meta = read_network_metadata(trainer.checkpoints.network_path(1, "lm"))
    assert json.loads(meta["codec"])["name"] == "mel_rvq"
    assert json.loads(meta["phonemizer"])["language"] == "en-us"
    assert meta["phoneme_vocab"] == trainer.datasets["train"].vocab.to_json()
