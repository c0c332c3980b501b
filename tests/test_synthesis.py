"""Synthesis from a checkpoint (Python API and CLI) and the tts_samples evaluator in training."""

import math
import subprocess
import sys

import pytest
import soundfile as sf
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import (
    CODEC_ARCH,
    REPO,
    SYNTH_OPTS,
    TINY,
    make_corpus,
    tb_scalars,
    write_checkpoint,
    write_prompt,
)
from models.audio.codecs import CodecUnavailable
from models.audio.tts.synthesis import Synthesizer, pad_batch  # registers `valle` too
from trainer.evaluators.speech_samples import mel_stft_loss
from trainer.evaluators.tts_samples import TtsSamplesEvaluator  # registers it
from utils.errors import run_command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    model = write_checkpoint(root / "valle.safetensors")
    return root / "valle.safetensors", model, write_prompt(root / "ref.wav")


def test_synthesizer_round_trip(checkpoint):
    path, model, ref = checkpoint
    synth = Synthesizer.from_checkpoint(path, codec_options={"pretrained": False})
    assert synth.sample_rate == 16000 and synth.frame_rate == 50
    for name, tensor in model.state_dict().items():  # the saved weights, not a fresh init
        assert torch.equal(synth.model.state_dict()[name], tensor), name
    assert not synth.model.training

    prompt = synth.encode_prompt(ref, seconds=1.0)
    assert prompt.shape == (2, 16000 // 320 + 1) and prompt.dtype == torch.long
    assert synth.encode_prompt(ref, seconds=None).shape[1] == int(1.5 * 16000) // 320 + 1
    wav, _ = sf.read(ref, dtype="float32")
    from_tensor = synth.encode_prompt(torch.from_numpy(wav), seconds=1.0, sample_rate=22050)
    assert torch.equal(from_tensor, prompt)  # a tensor at its own rate = the file

    texts = ["the cat sat down", "time flies like an arrow"]
    wavs = synth.synthesize(texts, prompt, max_duration=0.4, seed=0, **SYNTH_OPTS)
    assert len(wavs) == 2
    for w in wavs:
        assert w.dim() == 1 and 0 < w.numel() <= 0.4 * 16000 and torch.isfinite(w).all()
        assert w.numel() % 320 == 0  # whole code frames
    again = synth.synthesize(texts, [prompt, prompt], max_duration=0.4, seed=0, **SYNTH_OPTS)
    assert all(torch.equal(a, b) for a, b in zip(wavs, again))  # seeded: repeatable

    with pytest.raises(TypeError, match="list of texts"):
        synth.synthesize("one text", prompt)
    with pytest.raises(ValueError, match="2 texts but 3 prompts"):
        synth.synthesize(texts, [prompt] * 3)
    with pytest.raises(ValueError, match="no phonemes"):
        synth.synthesize(["  "], prompt)


def test_codec_options_override_the_stored_config(checkpoint):
    path, _, _ = checkpoint
    with pytest.raises(CodecUnavailable, match="gone.st not found"):
        Synthesizer.from_checkpoint(path)  # the stored mel_rvq file is missing here
    synth = Synthesizer.from_checkpoint(
        path, codec_options={"pretrained": False, "griffin_lim_iters": 2}
    )
    assert synth.codec.griffin_lim_iters == 2


def test_checkpoint_without_synthesis_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    write_checkpoint(path, phoneme_vocab=None, codec=None)
    with pytest.raises(ValueError) as e:
        Synthesizer.from_checkpoint(path)
    msg = str(e.value)
    assert "'phoneme_vocab', 'codec'" in msg and "VALL-E checkpoint saved by this trainer" in msg
    assert str(path) in msg


@pytest.mark.slow
def test_cli_writes_wavs(checkpoint, tmp_path):
    path, _, ref = checkpoint
    out = tmp_path / "out.wav"
    r = subprocess.run(
        [
            sys.executable,
            "synthesize.py",
            "--model",
            str(path),
            "--text",
            "the cat sat down",
            "--text",
            "bring me the red book",
            "--prompt",
            str(ref),
            "--prompt-seconds",
            "1",
            "--out",
            str(out),
            "--max-duration",
            "0.5",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--codec-option",
            "pretrained=false",
        ],
        cwd=REPO / "codebase",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for i in range(2):
        info = sf.info(str(tmp_path / f"out_{i}.wav"))
        assert info.samplerate == 16000 and 0 < info.frames <= 0.5 * 16000
        assert f"wrote {tmp_path / f'out_{i}.wav'}" in r.stdout
    assert "real-time factor" in r.stdout and not out.exists()


def test_cli_text_file_out_dir_and_errors(checkpoint, tmp_path, capsys):
    import synthesize

    path, _, ref = checkpoint
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat down\n\nopen the door slowly\n", encoding="utf-8")
    rc = run_command(
        synthesize.main,
        [
            "--model",
            str(path),
            "--text-file",
            str(texts),
            "--prompt",
            str(ref),
            "--out-dir",
            str(tmp_path / "wavs"),
            "--max-duration",
            "0.3",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--codec-option",
            "pretrained=false",
        ],
    )
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "wavs").iterdir()) == ["0.wav", "1.wav"]
    assert "2 file(s)" in capsys.readouterr().out

    bare = tmp_path / "bare.safetensors"
    write_checkpoint(bare, codec=None)
    rc = run_command(
        synthesize.main,
        [
            "--model",
            str(bare),
            "--text",
            "hi",
            "--prompt",
            str(ref),
            "--out",
            str(tmp_path / "x.wav"),
        ],
    )
    assert rc == 5 and "no 'codec' metadata" in capsys.readouterr().err
    rc = run_command(synthesize.main, ["--model", str(path), "--prompt", str(ref)])  # no text
    assert rc == 2 and "at least one --text" in capsys.readouterr().err
    assert (
        run_command(
            synthesize.main,
            [
                "--model",
                str(path),
                "--prompt",
                str(ref),
                "--text",
                "a",
                "--codec-option",
                "pretrained",
            ],
        )
        == 2
    )
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_pad_batch():
    batch, lengths = pad_batch(
        [torch.ones(2, 3, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)]
    )
    assert batch.shape == (2, 2, 3) and lengths.tolist() == [3, 1] and batch[1, :, 1:].sum() == 0


def test_mel_stft_score_matches_auraloss_definition():
    """Zero for identical audio, positive otherwise, and auraloss' mel filters (no librosa)."""
    loss = mel_stft_loss(16000)
    x = torch.randn(1, 1, 8000) * 0.1
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(x, torch.randn(1, 1, 8000) * 0.1)) > 0.1
    assert loss.fb.shape == (1, 80, 513)


def test_evaluator_checks_its_runtime_arguments(tmp_path):
    from trainer.component import TrainerEnv

    env = TrainerEnv(device=torch.device("cpu"), run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no network 'valle'; the networks are \['lm'\]"):
        TtsSamplesEvaluator(networks={"lm": None}, env=env, datasets={}, logger=None)
    with pytest.raises(ValueError, match=r"no dataset phase 'val'; the datasets are \['train'\]"):
        TtsSamplesEvaluator(networks={"valle": None}, env=env, datasets={"train": []}, logger=None)

    class Data(list):
        def __init__(self, codec):
            super().__init__([{}] * 4)
            self.codec_config, self.speakers = codec, ["a", "b", "a", "b"]

    codec = {"name": "mel_rvq", "checkpoint": "c.safetensors", "n_levels": 4}
    kw = dict(networks={"valle": torch.nn.Linear(1, 1)}, env=env, logger=None)
    datasets = {"val": Data(codec), "old": Data({**codec, "checkpoint": "other.safetensors"})}
    with pytest.raises(ValueError, match="num_samples 0 and teacher_forced_items 0 leave nothing"):
        TtsSamplesEvaluator(num_samples=0, teacher_forced_items=0, datasets=datasets, **kw)
    with pytest.raises(
        ValueError, match=r"no dataset phase 'olds'; the datasets are \['old', 'val'"
    ):
        TtsSamplesEvaluator(voice_references=["olds"], datasets=datasets, **kw)
    with pytest.raises(ValueError, match=r"'old' was coded with another codec .*\['checkpoint'\]"):
        TtsSamplesEvaluator(voice_references=["old"], datasets=datasets, **kw)
    with pytest.raises(ValueError, match="voice_reference_items must be >= 1"):
        TtsSamplesEvaluator(voice_references=[], voice_reference_items=0, datasets=datasets, **kw)


@pytest.mark.slow
def test_tts_samples_evaluator_during_training(tmp_path):
    make_corpus(tmp_path / "corpus", n=8)
    data = {"mode": "hdf5_codes", "path": "data/data.h5", "batch_size": 4, "prompt_frames": 8}
    opt = {
        "name": "valle",
        "seed": 3,
        "device": "cpu",
        "datasets": {
            "train": {
                **data,
                "prepare": {
                    "fetcher_mode": "tsv",
                    "path": "corpus/index.tsv",
                    "codec": "mel_rvq",
                    "codec_options": CODEC_ARCH,
                    "fit_iters": 3,
                },
            },
            "val": data,
        },
        "networks": {"valle": {"which_model_G": "valle", "kwargs": TINY}},
        "steps": {
            "fit": {
                "training": "valle",
                "optimizer_params": {"lr": 1e-3},
                "injectors": {
                    "fwd": {
                        "type": "generator",
                        "generator": "valle",
                        "in": {
                            k: k
                            for k in (
                                "phonemes",
                                "phoneme_lengths",
                                "prompt",
                                "prompt_lengths",
                                "codes",
                                "code_lengths",
                            )
                        },
                        "out": ["loss_ar", "loss_nar", "acc_ar", "acc_nar"],
                    }
                },
                "losses": {
                    "ar": {"type": "direct", "key": "loss_ar"},
                    "nar": {"type": "direct", "key": "loss_nar"},
                },
            }
        },
        "train": {"niter": 2},
        "eval": {
            "every": 2,
            "at_start": True,
            "evaluators": {
                "samples": {
                    "type": "tts_samples",
                    "dataset": "val",
                    "num_samples": 2,
                    "batch_size": 3,
                    "max_duration_factor": 1.5,
                    "top_k": 4,
                    "voice_references": [],  # the val set's own 2 voices
                    "voice_reference_items": 2,
                }
            },
        },
        "logger": {"print_freq": 1, "progress_bar": False, "stdin_commands": False},
    }
    path = tmp_path / "valle.yml"
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    from trainer.config import validate_experiment
    from trainer.extensible_trainer import ExtensibleTrainer
    from utils.options import load_options

    runner = ExtensibleTrainer(validate_experiment(load_options(path)))
    runner.train()
    run = tmp_path / "valle"
    val = runner.datasets["val"]
    [ev] = runner.evaluators.values()
    picked = ev.picked  # taken in turn from each speaker
    assert len(picked) == 2 and len({val.speakers[j] for j in picked}) == 2
    folder = run / "samples" / "2"
    for j in picked:
        name = val.ids[j]
        for suffix in ("", "_ref"):
            assert (folder / f"{name}{suffix}.wav").is_file()
            assert (folder / f"{name}{suffix}.png").is_file()
        gen = sf.info(str(folder / f"{name}.wav")).frames
        ref = sf.info(str(folder / f"{name}_ref.wav")).frames
        assert ref == val.frames(j) * 320 and 0 < gen <= math.ceil(1.5 * val.frames(j)) * 320
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{val.ids[j]}{s}.{e}" for j in picked for s in ("", "_ref") for e in ("wav", "png")
    )
    scalars = tb_scalars(run)
    (step0, _), (step, mel) = scalars["eval/mel_stft"]  # at_start: before the first step too
    (_, ratio) = scalars["eval/duration_ratio"][-1]
    assert (step0, step) == (0, 2) and mel > 0
    assert 0 < ratio <= max(math.ceil(1.5 * val.frames(j)) / val.frames(j) for j in picked)
    for key in (
        "tf_loss_ar",
        "tf_loss_nar",
        "tf_acc_ar",
        "tf_acc_ar_repeat_baseline",
        "tf_acc_ar_changes",
        "tf_acc_nar",
        "dtw_own",
        "dtw_others",
        "own_closest",
        "own_closest_chance",
        "voice_closest",
        "voice_dist_own",
        "voice_dist_other",
        "pitch_error",
    ):
        assert [s for s, _ in scalars[f"eval/{key}"]] == [0, 2], key
    assert scalars["eval/voice_closest_chance"][-1][1] == 0.5  # 2 voices
    assert [len(v) for v in ev.voices().values()] == [2, 2]  # voice_reference_items each
    # The teacher-forced loss is the training loss on held-out items: the step-0 figure equals
    # a forward pass of the initial model (log(vocab) for near-uniform logits).
    (_, tf0), (_, tf2) = scalars["eval/tf_loss_ar"]
    assert tf0 == pytest.approx(math.log(TINY["codebook_size"] + 1), rel=0.1) and tf2 != tf0
    # All 8 held-out references are compared (8 items, 2 speakers: chance 1/4 each).
    assert scalars["eval/own_closest_chance"][-1][1] == pytest.approx(0.25)
    report = ev.report()
    assert "step 0" in report and "step 2" in report and "repeat previous code" in report
    assert str(folder) in report
    from trainer.run_summary import run_summary

    summary = run_summary(runner)
    assert "evaluator samples:" in summary and "tensorboard --logdir" in summary
    assert "synthesize.py --model" in summary and "2_valle_ema.safetensors" not in summary
    assert "2_valle.safetensors --prompt" in summary and "_ref.wav" in summary
    acc = EventAccumulator(str(run / "tb_logger"))
    acc.Reload()
    name = val.ids[picked[0]]
    assert {f"samples/{name}", f"samples/{name}_ref"} <= set(acc.Tags()["audio"])
    assert {f"samples/{name}_mel", f"samples/{name}_ref_mel"} <= set(acc.Tags()["images"])

    # The same weights and seed give the same samples: evaluations differ only by training.
    again = ev.evaluate(2)
    assert again["mel_stft"] == pytest.approx(mel, rel=1e-5)
    assert again["duration_ratio"] == pytest.approx(ratio, rel=1e-6)

    # The trainer's own checkpoint synthesizes with no options: its metadata names the fitted
    # codec file beside data.h5, the vocab and the phonemizer.
    synth = Synthesizer.from_checkpoint(runner.checkpoints.network_path(2, "valle"))
    assert synth.codec.pretrained and synth.vocab == val.vocab
    (wav,) = synth.synthesize(["the cat sat down"], val[0]["prompt"], max_duration=0.3, seed=0)
    assert 0 < wav.numel() <= 0.3 * 16000

    # Resumed (from step 2, to step 3): the evaluator's history is part of the checkpoint, so
    # the end-of-run report still puts step 0 beside the last step.
    resumed = ExtensibleTrainer(
        validate_experiment(
            load_options(path, ["path.resume_state=auto", "train.niter=3", "eval.every=3"])
        )
    )
    [ev2] = resumed.evaluators.values()
    assert [step for step, _ in ev2.history] == [0, 2]
    resumed.train()
    assert [step for step, _ in ev2.history] == [0, 2, 3]
    report = ev2.report()
    assert "step 0" in report and "step 3" in report
    first_row = report.splitlines()[1].split()  # label, step-0 value, step-3 value
    assert first_row[-2] == ev.report().splitlines()[1].split()[-2]  # the first run's step 0
