"""mel_rvq codec: fit, save/load, shapes, quality ordering and every user-facing error."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.audio.codecs.base import CodecUnavailable, build_codec
from models.audio.codecs.kmeans import kmeans
from models.audio.codecs.mel_rvq import MelRVQCodec

SR = 16000
SMALL = dict(n_levels=3, codebook_size=16)


def speechlike(seconds: float, seed: int) -> torch.Tensor:
    """Voiced syllables (harmonics over a moving pitch) alternating with noise bursts [T]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * seconds)) / SR
    f0 = 110 + 30 * seed + 40 * torch.sin(2 * math.pi * 0.7 * t)  # Hz, gliding
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    voiced = sum(torch.sin(h * phase) / h for h in range(1, 12))
    gate = (torch.sin(2 * math.pi * 3 * t + seed) > 0).float()  # ~3 syllables per second
    noise = torch.randn(t.shape, generator=g) * (1 - gate)
    return 0.2 * (voiced * gate + 0.5 * noise)


@pytest.fixture(scope="module")
def corpus() -> list[torch.Tensor]:
    return [speechlike(1.5, seed) for seed in range(3)]


@pytest.fixture(scope="module")
def fitted(corpus, tmp_path_factory) -> tuple[MelRVQCodec, Path]:
    path = tmp_path_factory.mktemp("mel_rvq") / "codec.safetensors"
    return MelRVQCodec.fit(corpus, path, iters=5, **SMALL), path


def test_fit_save_load_gives_identical_codes(fitted, corpus):
    codec, path = fitted
    assert path.is_file()
    loaded = build_codec("mel_rvq", checkpoint=path)
    assert (loaded.n_levels, loaded.codebook_size) == (3, 16)
    for wav in corpus:
        assert torch.equal(loaded.encode(wav), codec.encode(wav))
    # config() rebuilds the same codec (what data preparation stores next to the codes)
    config = loaded.config()
    assert config["name"] == "mel_rvq" and config["checkpoint"] == str(path.resolve())
    rebuilt = build_codec(config.pop("name"), **config)
    assert torch.equal(rebuilt.codebooks, codec.codebooks)


def test_every_level_lowers_reconstruction_error(fitted, corpus):
    codec, _ = fitted
    x = torch.cat([codec.normalized_mel(w[None]) for w in corpus], 1)  # [1, F, n_mels]
    codes = codec.quantize(x)
    errors = [float(((codec.dequantize(codes[:, :n]) - x) ** 2).mean()) for n in (1, 2, 3)]
    assert errors[0] < 1.0  # better than predicting the mean (unit variance per bin)
    assert errors[0] > errors[1] > errors[2], errors


def test_fit_is_deterministic_for_a_seed(corpus):
    a = MelRVQCodec.fit(corpus, iters=3, seed=1, **SMALL)
    b = MelRVQCodec.fit(corpus, iters=3, seed=1, **SMALL)
    c = MelRVQCodec.fit(corpus, iters=3, seed=2, **SMALL)
    assert torch.equal(a.codebooks, b.codebooks) and torch.equal(a.mean, b.mean)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_max_frames_subsamples_but_stats_see_everything(corpus):
    full = MelRVQCodec.fit(corpus, iters=2, **SMALL)
    sub = MelRVQCodec.fit(corpus, iters=2, max_frames=40, **SMALL)
    torch.testing.assert_close(sub.mean, full.mean)
    assert not torch.equal(sub.codebooks, full.codebooks)


def test_all_level0_codes_are_used_on_training_audio(fitted, corpus):
    codec, _ = fitted
    codes = torch.cat([codec.encode(w)[0] for w in corpus])
    assert torch.bincount(codes, minlength=16).min() > 0


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 4, 10, torch.Generator().manual_seed(0))
    assert torch.cdist(centres, found).min(1).values.max() < 0.2


@pytest.mark.parametrize("hop, fps", [(400, 40.0), (256, 62.5)])
def test_encode_shapes_match_frames_for(hop, fps):
    codec = MelRVQCodec(pretrained=False, hop_length=hop, **SMALL)
    assert codec.frame_rate == fps
    for n in (1, 255, 399, 400, 401, 1234, 8000):
        codes = codec.encode(torch.randn(n) * 0.1)
        assert codes.shape == (3, codec.frames_for(n)) and codes.dtype == torch.long
    batch = codec.encode(torch.randn(2, 4000) * 0.1)
    assert batch.shape == (2, 3, codec.frames_for(4000))


def test_decode_length_and_content(fitted, corpus):
    codec, _ = fitted
    wav = corpus[0]
    codes = codec.encode(wav)
    out = codec.decode(codes)
    assert out.shape == (codes.shape[-1] * 400,) and torch.isfinite(out).all()
    assert torch.equal(out, codec.decode(codes))  # fixed Griffin-Lim start: reproducible
    batch = codec.decode(torch.stack([codes, codes]).to(torch.int16))  # data.h5 stores int16
    assert batch.shape == (2, codes.shape[-1] * 400)
    assert codec.decode(codes[:, :1]).shape == (1 * 400,)
    # The decoded audio is heard as the same sound: its mel is far closer to the input's
    # than the input reversed in time is.
    x = codec.normalized_mel(wav[None])
    y = codec.normalized_mel(out[None])[:, : x.shape[1]]
    assert ((y - x) ** 2).mean() < 0.5 * ((x.flip(1) - x) ** 2).mean()


def test_missing_checkpoint_says_how_to_fit(tmp_path):
    with pytest.raises(CodecUnavailable, match=r"MelRVQCodec\.fit"):
        build_codec("mel_rvq")
    with pytest.raises(CodecUnavailable, match=r"nope\.safetensors not found.*fit"):
        build_codec("mel_rvq", checkpoint=tmp_path / "nope.safetensors")


def test_pretrained_false_gives_random_codebooks_of_configured_shape():
    codec = MelRVQCodec(pretrained=False, n_mels=40, n_levels=2, codebook_size=8)
    assert codec.codebooks.shape == (2, 8, 40)
    assert codec.codebooks.std() > 0
    assert codec.config()["checkpoint"] is None and codec.config()["pretrained"] is False
    codes = codec.encode(torch.randn(3000) * 0.1)
    assert codes.shape == (2, codec.frames_for(3000)) and int(codes.max()) < 8


def test_checkpoint_config_wins_and_conflicts_warn(fitted, caplog):
    _, path = fitted
    with caplog.at_level(logging.WARNING):
        codec = MelRVQCodec(checkpoint=path, hop_length=256, codebook_size=16)
    assert codec.hop_length == 400  # the file's
    assert "hop_length" in caplog.text and "codebook_size" not in caplog.text.split("ignoring")[-1]


def test_foreign_or_corrupt_file_is_refused(tmp_path):
    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not written by MelRVQCodec.save"):
        MelRVQCodec(checkpoint=foreign)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        MelRVQCodec(checkpoint=broken)


def test_fit_errors_name_the_problem(corpus):
    with pytest.raises(ValueError, match="codebook_size"):
        MelRVQCodec.fit([torch.randn(800)], n_levels=1, codebook_size=16)
    with pytest.raises(ValueError, match="item 1 must be a 1-d waveform"):
        MelRVQCodec.fit([corpus[0], torch.randn(2, 800)], **SMALL)
    with pytest.raises(ValueError, match="no audio"):
        MelRVQCodec.fit([], **SMALL)
    with pytest.raises(TypeError, match="writes them to `out`"):
        MelRVQCodec.fit(corpus, checkpoint="x")
    with pytest.raises(ValueError, match="hop_length"):
        MelRVQCodec(pretrained=False, hop_length=2048)


def test_decode_rejects_bad_codes(fitted):
    codec, _ = fitted
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        codec.decode(torch.full((3, 5), 16))
    with pytest.raises(ValueError, match="1..3 levels"):
        codec.decode(torch.zeros(4, 5, dtype=torch.long))
