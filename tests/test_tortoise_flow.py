"""The parts of the DLAS/Tortoise flow that the demo strings together: the mel features and their
inverse, a GPT recipe pointing at a DVAE run, the evaluators' wiring and Tortoise synthesis."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from models import build_network
from models.audio.tts.synthesis import NotASynthesisCheckpoint, SynthesisError, Synthesizer
from trainer.checkpoint import CheckpointManager
from trainer.evaluators.speech_metrics import code_prediction_sums
from trainer.evaluators.step_inputs import StepInputs
from trainer.injectors.dvae import read_dvae_config
from utils.audio import DlasMel

TINY_DVAE = {
    "channels": 80,
    "positional_dims": 1,
    "num_tokens": 16,
    "codebook_dim": 8,
    "hidden_dim": 8,
    "num_layers": 2,
    "num_resnet_blocks": 1,
    "kernel_size": 3,
    "use_transposed_convs": False,
}


def harmonic(f0: float, seconds: float = 1.0, sr: int = 16000) -> torch.Tensor:
    t = torch.arange(int(sr * seconds)) / sr
    return 0.2 * sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 6))


def _spectral_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per item: L1 distance of power mels relative to b's energy (phase-blind)."""
    power = DlasMel(sample_rate=16000, log=False)
    pa, pb = power(a), power(b)
    n = min(pa.shape[-1], pb.shape[-1])
    return (pa[..., :n] - pb[..., :n]).abs().sum((1, 2)) / pb[..., :n].sum((1, 2))


@pytest.mark.parametrize(
    "options",
    [
        {"mel_norms": torch.linspace(-8.0, -2.0, 80)},
        {"normalize": True},
        {"true_normalization": True},
        {"log": False},
    ],
)
def test_mel_inverse_gives_back_audio_with_the_same_spectrum(options):
    mel = DlasMel(sample_rate=16000, **options)
    clips = torch.stack([harmonic(150.0), harmonic(260.0)])
    feats = mel(clips)  # [2, 80, frames]
    audio = mel.to_audio(feats)
    assert audio.shape == (2, feats.shape[-1] * 256)
    # Griffin-Lim loses the phase, not the spectrum: each output is close to its own clip's
    # spectrum (measured 0.25, 0.31), far from the other clip's (1.96, 1.66), same energy.
    own, swapped = _spectral_error(audio, clips), _spectral_error(audio, clips.flip(0))
    assert (own < 0.4).all() and (swapped > 4 * own).all(), (own, swapped)
    energy = audio.pow(2).mean(1) / clips.pow(2).mean(1)
    assert ((energy > 0.8) & (energy < 1.25)).all(), energy
    # the description a checkpoint carries rebuilds the same features
    rebuilt = DlasMel.from_config(json.loads(json.dumps(mel.config())))
    assert torch.equal(rebuilt(clips[:1]), feats[:1])


def test_code_prediction_sums_count_positions_after_the_first():
    target = torch.tensor([[5, 5, 7, 7, 9, 0]])
    predicted = torch.tensor([[1, 5, 5, 7, 9, 3]])
    valid = torch.tensor([[True] * 5 + [False]])
    sums = code_prediction_sums(predicted, target, valid)
    # positions 1..4: targets 5 7 7 9 after 5 5 7 7; predicted 5 5 7 9
    assert sums == {
        "ar_frames": 4.0,
        "ar_hits": 3.0,  # 5, 7, 9
        "repeat_hits": 2.0,  # 5 after 5, 7 after 7
        "changes": 2.0,  # 7 after 5, 9 after 7
        "change_hits": 1.0,  # 9
    }


def _dvae_experiment(folder, name="dv"):
    config = folder / "dvae.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "networks": {"dvae": {"which_model_G": "lucidrains_dvae", "kwargs": TINY_DVAE}},
            }
        )
    )
    return config


def test_dvae_config_may_be_the_experiment_that_trained_it(tmp_path):
    config = _dvae_experiment(tmp_path)
    with pytest.raises(ValueError, match="no intact checkpoint yet.*train the DVAE first"):
        read_dvae_config(config, None)
    torch.manual_seed(0)
    dvae = build_network("lucidrains_dvae", TINY_DVAE)
    manager = CheckpointManager(tmp_path / "dv")
    for step in (2, 4):
        manager.save(step, {"dvae": (dvae, "lucidrains_dvae", TINY_DVAE)}, {}, ema={"dvae": dvae})
    source = read_dvae_config(config, None)
    assert source.weights == manager.network_path(4, "dvae", ema=True)  # newest, EMA copy
    assert source.kwargs == TINY_DVAE
    # the kwargs come from the checkpoint: a run trained with `-o` overrides still loads
    config.write_text(config.read_text().replace("hidden_dim: 8", "hidden_dim: 64"))
    assert read_dvae_config(config, None).kwargs == TINY_DVAE
    # a damaged newest checkpoint is skipped: the DVAE comes from the one before
    data = bytearray(source.weights.read_bytes())
    data[-3] ^= 0xFF
    source.weights.write_bytes(bytes(data))
    assert read_dvae_config(config, None).weights == manager.network_path(2, "dvae", ema=True)
    with pytest.raises(ValueError, match="no network 'other'"):
        read_dvae_config(config, "other")


class _Step:
    def __init__(self, training, injectors):
        self.spec = type("Spec", (), {"training": training})()
        self.injectors = injectors


def test_step_inputs_errors_name_what_is_missing():
    from trainer.injectors.base import GeneratorInjector

    with pytest.raises(ValueError, match="no step trains network 'gpt'"):
        StepInputs({"s": _Step("other", [])}, "gpt", ("a",))
    with pytest.raises(ValueError, match="no generator injector calling 'gpt'"):
        StepInputs({"s": _Step("gpt", [])}, "gpt", ("a",))
    inj = GeneratorInjector("gpt", {"gpt": torch.nn.Identity()})
    inj.input_map, inj.inputs, inj.outputs, inj.path = None, ["x"], ["y"], "steps.s.fwd"
    with pytest.raises(ValueError, match=r"does not give 'gpt' the arguments \['b'\]"):
        StepInputs({"s": _Step("gpt", [inj])}, "gpt", ("a", "b"))
    found = StepInputs({"s": _Step("gpt", [inj])}, "gpt", ("a",))
    assert found.keys == {"a": "x"} and found.before == []


def test_gpt_file_without_tortoise_metadata_is_refused_clearly(tmp_path):
    gpt = build_network("unified_voice2", {"layers": 1, "model_dim": 16, "heads": 2})
    manager = CheckpointManager(tmp_path / "run")
    manager.save(
        1, {"gpt": (gpt, "unified_voice2", {"layers": 1, "model_dim": 16, "heads": 2})}, {}
    )
    with pytest.raises(NotASynthesisCheckpoint, match="text_tokenizer.*mel_spectrogram.*dvae"):
        Synthesizer.from_checkpoint(manager.network_path(1, "gpt"))


@pytest.fixture
def tortoise_checkpoint(tmp_path):
    """A tiny GPT network file with the metadata the trainer gives a Tortoise recipe's."""
    from data.audio.bpe_tokenizer import BpeTokenizer
    from trainer.injectors.dvae import DiscreteTokenInjector

    torch.manual_seed(0)
    dvae = build_network("lucidrains_dvae", TINY_DVAE)
    dvae_run = CheckpointManager(tmp_path / "dv")
    dvae_run.save(3, {"dvae": (dvae, "lucidrains_dvae", TINY_DVAE)}, {})
    injector = DiscreteTokenInjector.__new__(DiscreteTokenInjector)
    injector.source = read_dvae_config(_dvae_experiment(tmp_path), None)
    kwargs = {
        "layers": 1,
        "model_dim": 16,
        "heads": 2,
        "number_mel_codes": 18,
        "start_mel_token": 16,
        "stop_mel_token": 17,
    }
    gpt = build_network("unified_voice2", kwargs)
    meta = {
        **injector.checkpoint_metadata(),
        "text_tokenizer": json.dumps(BpeTokenizer(cleaners="basic").config()),  # no inflect: 5 s
        "mel_spectrogram": json.dumps(DlasMel(sample_rate=16000).config()),
    }
    run = CheckpointManager(tmp_path / "gpt")
    run.save(5, {"gpt": (gpt, "unified_voice2", kwargs)}, {}, metadata=meta)
    return run.network_path(5, "gpt"), dvae_run.network_path(3, "dvae")


def test_tortoise_synthesizer_speaks_a_batch_of_texts(tortoise_checkpoint, tmp_path):
    from models.audio.tts.tortoise_synthesis import TortoiseSynthesizer

    path, _ = tortoise_checkpoint
    synth = Synthesizer.from_checkpoint(path)
    assert isinstance(synth, TortoiseSynthesizer) and synth.sample_rate == 16000
    voice = synth.encode_prompt([harmonic(150.0, 1.2), harmonic(180.0, 0.7)], seconds=1.0)
    assert voice.shape == (2, 80, 16000 // 256 + 1)
    assert synth.prompt_seconds(voice) == pytest.approx(62 * 256 / 16000)
    texts = ["Hello there, how are you?", "Hi."]
    codes = synth.generate(texts, voice, max_duration=1.0, seed=0)
    assert all(c.dtype == torch.long and (c < 16).all() for c in codes)
    assert all(len(c) <= synth.max_frames(1.0) == 15 for c in codes)
    again = synth.generate(texts, voice, max_duration=1.0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(codes, again))  # seeded
    wavs = synth.decode(codes)
    assert [w.numel() for w in wavs] == [4 * 256 * len(c) for c in codes]
    with pytest.raises(SynthesisError, match="VALL-E options"):
        synth.generate(texts, voice, repetition_penalty=1.2)
    (warning,) = synth.text_warnings(["Room # one.", "Fine."])  # '#' is not in the vocabulary
    assert "'#'" in warning and "[UNK]" in warning


def test_tortoise_synthesizer_names_a_moved_dvae(tortoise_checkpoint):
    path, dvae_weights = tortoise_checkpoint
    moved = dvae_weights.with_name("moved.safetensors")
    dvae_weights.rename(moved)
    with pytest.raises(NotASynthesisCheckpoint, match="dvae_weights="):
        Synthesizer.from_checkpoint(path)
    synth = Synthesizer.from_checkpoint(path, codec_options={"dvae_weights": str(moved)})
    assert synth.dvae.num_tokens == 16
    with pytest.raises(SynthesisError, match="griffin_lim_iters"):
        Synthesizer.from_checkpoint(path, codec_options={"griffin_lim_iter": 8})
