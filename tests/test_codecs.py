"""Pretrained-codec backends (encodec, vocos, dac) with random weights, and the codec injectors.

No test touches the network: every cache points into tmp_path and sockets refuse to connect.
"""

import importlib.util
import math
import socket

import pytest
import torch
import torchaudio.functional as AF

import models.audio.codecs.dac  # noqa: F401  (registers "dac"; importable without the package)
from helpers import build_from_yaml
from models.audio.codecs.base import CodecUnavailable, build_codec
from models.audio.codecs.encodec import (
    ENCODEC_24KHZ_FILE,
    ENCODEC_24KHZ_URL,
    EncodecCodec,
    encodec_cache_path,
)
from models.audio.codecs.vocos import VOCOS_WEIGHTS, VocosCodec, _vocos_weights
from trainer.injectors.base import INJECTORS
from trainer.injectors.codec import shared_codec
from utils.schema import Problems

RANDOM = {"pretrained": False}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Empty caches under tmp_path, hub offline, and any connection attempt fails the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # DAC's cache is under ~/.cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise AssertionError("a codec tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


@pytest.fixture(scope="module")
def encodec():
    # Built through the injectors' cache, so injectors with the same options reuse it.
    return shared_codec("encodec", RANDOM, "cpu")


@pytest.fixture(scope="module")
def vocos():
    return shared_codec("vocos", RANDOM, "cpu")


def speech_like(batch: int = 2, samples: int = 12000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 24000
    tone = torch.sin(2 * math.pi * 220 * t) * torch.linspace(0.1, 0.5, batch)[:, None]
    return tone + 0.02 * torch.randn(batch, samples, generator=g)


# ----------------------------------------------------------------------------- encodec


def test_encodec_random_round_trip_shapes(encodec):
    wav = speech_like()
    codes = encodec.encode(wav)
    assert encodec.n_levels == 8 and encodec.codebook_size == 1024
    assert encodec.sample_rate == 24000 and encodec.frame_rate == 75
    assert codes.dtype == torch.long and codes.shape == (2, 8, math.ceil(12000 / 320))
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    # random codebooks are spread out, not EnCodec's untrained all-zero ones
    assert codes[:, 0].unique().numel() > 4 and codes[:, 7].unique().numel() > 4
    audio = encodec.decode(codes)
    assert audio.shape == (2, 38 * 320) and torch.isfinite(audio).all() and audio.abs().max() > 0
    assert torch.equal(encodec.encode(wav[1]), codes[1])  # 1-d in, [levels, frames] out
    assert encodec.decode(codes[1]).shape == (38 * 320,)
    for n in (8000, 8001):
        assert encodec.encode(wav[:1, :n]).shape[-1] == encodec.frames_for(n) == -(-n // 320)
    assert encodec.config() == {
        "name": "encodec",
        "bandwidth": 6.0,
        "model": "24khz",
        "pretrained": False,
    }


def test_encodec_is_deterministic_and_seeded(encodec):
    wav = speech_like(seed=1)
    codes = encodec.encode(wav)
    assert torch.equal(encodec.encode(wav), codes)
    torch.manual_seed(123)
    other = build_codec("encodec", pretrained=False, bandwidth=1.5)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_build), "building moved the caller's RNG"
    # same seeded weights in every process: 1.5 kbps codes are the first 2 levels of 6 kbps ones
    assert other.n_levels == 2
    assert torch.equal(other.encode(wav), codes[:, :2])


def test_encodec_bad_options():
    with pytest.raises(ValueError, match=r"bandwidth 5.0 kbps .* one of \[1.5, 3.0, 6.0, 12.0"):
        EncodecCodec(bandwidth=5.0, pretrained=False)
    with pytest.raises(ValueError, match="only '24khz'"):
        EncodecCodec(model="48khz", pretrained=False)
    with pytest.raises(ValueError, match="only read with `pretrained: true`"):
        EncodecCodec(pretrained=False, checkpoint="x.th")


def test_decode_rejects_bad_codes(encodec):
    codes = torch.zeros(1, 8, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1024\), got \[0, 1024\]"):
        encodec.decode(codes.index_fill(2, torch.tensor([4]), 1024))
    with pytest.raises(ValueError, match="codes have 4 levels .* the codec has 8"):
        encodec.decode(codes[:, :4])
    with pytest.raises(TypeError, match="integer tensor"):
        encodec.decode(codes.float())
    with pytest.raises(ValueError, match="audio is empty"):
        encodec.encode(torch.zeros(1, 0))


def test_encodec_missing_weights_names_file_and_url(offline):
    expected = offline / "torch" / "hub" / "checkpoints" / ENCODEC_24KHZ_FILE
    assert encodec_cache_path() == expected
    with pytest.raises(CodecUnavailable) as err:
        EncodecCodec(pretrained=True)
    assert str(expected) in str(err.value) and ENCODEC_24KHZ_URL in str(err.value)
    assert "pretrained: false" in str(err.value)


def test_encodec_loads_weights_from_cache_or_checkpoint(encodec, offline):
    cache = encodec_cache_path()
    cache.parent.mkdir(parents=True)
    torch.save(encodec.model.state_dict(), cache)
    wav = speech_like(batch=1, samples=4000)
    loaded = build_codec("encodec")  # pretrained by default, found in torch.hub's cache
    assert torch.equal(loaded.encode(wav), encodec.encode(wav))
    assert loaded.config()["pretrained"] is True
    wrong = offline / "wrong.th"
    torch.save({"not": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=f"{wrong} is not the EnCodec 24 kHz state dict"):
        EncodecCodec(checkpoint=str(wrong))  # `checkpoint` wins over the cache


# ----------------------------------------------------------------------------- vocos


def test_vocos_random_decodes_encodec_codes(encodec, vocos):
    wav = speech_like()
    codes = vocos.encode(wav)
    assert torch.equal(codes, encodec.encode(wav))  # EnCodec codes, same seeded weights
    audio = vocos.decode(codes)
    assert audio.shape == (2, codes.shape[-1] * 320) and torch.isfinite(audio).all()
    assert not audio.is_inference() and audio.abs().max() > 0
    assert vocos.decode(codes[0]).shape == (codes.shape[-1] * 320,)
    assert (vocos.n_levels, vocos.sample_rate, vocos.frames_for(12000)) == (8, 24000, 38)
    with pytest.raises(ValueError, match=r"bandwidth 24.0 kbps .* \[1.5, 3.0, 6.0, 12.0\]"):
        VocosCodec(bandwidth=24.0, pretrained=False)


def test_vocos_missing_weights_names_hub_cache_and_encodec(offline):
    with pytest.raises(CodecUnavailable) as err:
        VocosCodec()
    message = str(err.value)
    assert str(offline / "hf" / "models--charactr--vocos-encodec-24khz") in message
    assert f"resolve/main/{VOCOS_WEIGHTS}" in message and ENCODEC_24KHZ_FILE in message


def test_vocos_loads_from_hub_cache(encodec, vocos, offline):
    repo = offline / "hf" / "models--charactr--vocos-encodec-24khz"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    state = {
        k: v
        for k, v in vocos.vocos.state_dict().items()
        if not k.startswith("feature_extractor.encodec.")
    }  # as in the released file
    state["head.out.bias"] = state["head.out.bias"] + 0.5  # so loading is visible
    torch.save(state, repo / "snapshots" / "0123abcd" / VOCOS_WEIGHTS)
    encodec_cache_path().parent.mkdir(parents=True)
    torch.save(encodec.model.state_dict(), encodec_cache_path())
    snapshot = repo / "snapshots" / "0123abcd"
    assert _vocos_weights(snapshot) == snapshot / VOCOS_WEIGHTS  # `checkpoint:` may be a folder
    loaded = VocosCodec(pretrained=True)
    assert torch.equal(loaded.vocos.head.out.bias, state["head.out.bias"])
    codes = encodec.encode(speech_like(batch=1, samples=3200))
    assert loaded.decode(codes).shape == (1, 10 * 320)


# ----------------------------------------------------------------------------- dac


@pytest.mark.skipif(importlib.util.find_spec("dac") is not None, reason="dac is installed")
def test_dac_without_package_says_how_to_install():
    with pytest.raises(CodecUnavailable, match=r"pip install -e '\.\[dac\]'"):
        build_codec("dac", pretrained=False)


def test_dac_random_round_trip():
    pytest.importorskip("dac")
    codec = build_codec("dac", model_type="24khz", n_levels=8, pretrained=False)
    wav = speech_like(batch=1, samples=12001)
    codes = codec.encode(wav)
    assert codes.shape == (1, 8, codec.frames_for(12001)) == (1, 8, 38)
    assert torch.equal(codec.encode(wav), codes)
    assert codec.decode(codes).shape == (1, 38 * 320)


# ----------------------------------------------------------------------------- injectors

COMMON = ("type", "in", "out", "train", "eval", "after", "before", "every")


def build(options: dict, tmp_path, path: str = "steps.s.injectors.x"):
    return build_from_yaml(INJECTORS, options, base_dir=tmp_path, path=path)


def test_audio_to_codes_resamples_and_counts_frames(encodec, tmp_path):
    inj = build(
        {
            "type": "audio_to_codes",
            "codec": "encodec",
            "codec_options": RANDOM,
            "sample_rate": 16000,
            "in": ["wav", "wav_len"],
            "out": ["codes", "code_len"],
        },
        tmp_path,
    )
    assert inj.codec is encodec  # the module fixture's instance, from the shared cache
    wav16 = speech_like(samples=8000)  # 0.5 s at 16 kHz
    out = inj({"wav": wav16.unsqueeze(1), "wav_len": torch.tensor([8000, 4000])})
    expected = encodec.encode(AF.resample(wav16, 16000, 24000))
    assert torch.equal(out["codes"], expected) and out["codes"].shape == (2, 8, 38)
    assert out["code_len"].tolist() == [38, 19]  # 4000 -> 6000 samples at 24 kHz -> 19 frames
    with pytest.raises(ValueError, match=r"must be mono audio \[B, T\]"):
        inj({"wav": torch.zeros(2, 2, 100), "wav_len": torch.tensor([1, 1])})


def test_codes_to_audio_masks_padding(encodec, tmp_path):
    inj = build(
        {
            "type": "codes_to_audio",
            "codec": "encodec",
            "codec_options": RANDOM,
            "in": ["codes", "code_len"],
            "out": ["audio", "audio_len"],
        },
        tmp_path,
    )
    codes = encodec.encode(speech_like())
    codes[1, :, 19:] = 1024  # padding ids past the second item's length
    out = inj({"codes": codes, "code_len": torch.tensor([38, 19])})
    assert out["audio"].shape == (2, 38 * 320) and out["audio_len"].tolist() == [12160, 6080]
    assert out["audio"][1, 6080:].abs().max() == 0 and out["audio"][1, :6080].abs().max() > 0
    assert torch.allclose(out["audio"][0], encodec.decode(codes[:1])[0])
    plain = build(
        {
            "type": "codes_to_audio",
            "codec": "encodec",
            "codec_options": RANDOM,
            "sample_rate": 16000,
            "in": "codes",
            "out": "audio",
        },
        tmp_path,
    )
    assert plain({"codes": codes[:1]})["audio"].shape == (1, math.ceil(12160 * 16000 / 24000))
    with pytest.raises(ValueError, match="replace padding ids"):
        plain({"codes": codes})


def test_shared_codec_cache_and_freezing(encodec, tmp_path):
    a = build(
        {
            "type": "audio_to_codes",
            "codec": "encodec",
            "codec_options": RANDOM,
            "in": "wav",
            "out": "codes",
        },
        tmp_path,
    )
    b = build(
        {
            "type": "codes_to_audio",
            "codec": "encodec",
            "codec_options": {"pretrained": False},
            "in": "codes",
            "out": "wav",
        },
        tmp_path,
    )
    assert a.codec is b.codec is encodec
    assert shared_codec("encodec", {"pretrained": False, "bandwidth": 1.5}, "cpu") is not encodec
    assert not list(a.children()) and not a.state_dict()  # the trainer never saves or casts it
    assert not encodec.training and not any(p.requires_grad for p in encodec.parameters())


def test_codec_injector_option_errors(tmp_path):
    problems = Problems()
    cls = INJECTORS.get("audio_to_codes")
    cls.check_options(
        {"codec": "encodec", "codec_options": {"bandwith": 6}}, "s.x", problems, tmp_path
    )
    cls.check_options({"codec": "encodek"}, "s.y", problems, tmp_path)
    found = dict(problems.items)
    assert "bandwidth" in found["s.x.codec_options.bandwith"]
    assert "'encodec'" in found["s.y.codec"]
    with pytest.raises(ValueError, match="`out` is one key, or two when `in` has lengths"):
        build(
            {
                "type": "audio_to_codes",
                "codec": "encodec",
                "codec_options": RANDOM,
                "in": "wav",
                "out": ["codes", "code_len"],
            },
            tmp_path,
        )
