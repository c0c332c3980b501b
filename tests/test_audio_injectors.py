"""torch_mel_spectrogram and random_audio_crop injectors."""

import pytest
import torch
import torchaudio
from safetensors.torch import save_file

import trainer.injectors.audio  # noqa: F401 - registers the audio injectors
from helpers import build_from_yaml, load_script
from trainer.injectors import INJECTORS
from utils.schema import Problems

COMMON = ("type", "in", "out", "train", "eval", "after", "before", "every")


def build(options, path="steps.s.injectors.x"):
    """Validate YAML-style options as the trainer does and build the injector."""
    return build_from_yaml(INJECTORS, options, path=path)


def reference_mel(wav, **kw):
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=kw.get("sample_rate", 22050),
        n_fft=1024,
        hop_length=256,
        win_length=1024,
        f_min=0.0,
        f_max=8000.0,
        n_mels=80,
        power=2.0,
        normalized=False,
        norm="slaney",
    )(wav)
    return torch.log(torch.clamp(mel, min=1e-5))


def test_mel_matches_torchaudio_and_shapes():
    torch.manual_seed(0)
    wav = torch.randn(2, 5000) * 0.1
    inj = build({"type": "torch_mel_spectrogram", "in": "wav", "out": "mel"})
    assert inj.component_name == "x" and type(inj).__name__ == "TorchMelSpectrogramInjector"
    mel = inj({"wav": wav})["mel"]
    assert mel.shape == (2, 80, 5000 // 256 + 1)
    assert torch.allclose(mel, reference_mel(wav), atol=1e-5)
    assert torch.allclose(inj({"wav": wav[:, None]})["mel"], mel)  # [B, 1, T] input
    assert isinstance(inj.mel, torchaudio.transforms.MelSpectrogram)  # moves with .to()
    power = build(
        {
            "type": "torch_mel_spectrogram",
            "in": "wav",
            "out": "mel",
            "log": False,
            "n_mels": 64,
            "sample_rate": 16000,
            "hop_length": 160,
        }
    )({"wav": wav})["mel"]
    assert power.shape == (2, 64, 5000 // 160 + 1) and (power >= 0).all()
    with pytest.raises(ValueError, match="\\[B, T\\] or \\[B, 1, T\\]"):
        inj({"wav": wav[None, :, None]})


def test_mel_norm_file_pth_and_safetensors(tmp_path):
    torch.manual_seed(1)
    wav = torch.randn(1, 4000) * 0.1
    norms = torch.rand(80) + 0.5
    torch.save(norms, tmp_path / "clips_mel_norms.pth")
    save_file({"mel_norms": norms}, str(tmp_path / "norms.safetensors"))
    expected = reference_mel(wav) / norms[None, :, None]
    for name in ("clips_mel_norms.pth", "norms.safetensors"):
        inj = build(
            {
                "type": "torch_mel_spectrogram",
                "in": "w",
                "out": "m",
                "mel_norm_file": str(tmp_path / name),
            }
        )
        assert torch.allclose(inj({"w": wav})["m"], expected, atol=1e-5)
        assert "mel_norms" not in inj.state_dict()  # a derived constant, not a weight

    torch.save(torch.ones(40), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth.*80"):
        build(
            {
                "type": "torch_mel_spectrogram",
                "in": "w",
                "out": "m",
                "mel_norm_file": str(tmp_path / "wrong.pth"),
            }
        )
    save_file({"other": norms}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'mel_norms'"):
        build(
            {
                "type": "torch_mel_spectrogram",
                "in": "w",
                "out": "m",
                "mel_norm_file": str(tmp_path / "other.safetensors"),
            }
        )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build(
            {
                "type": "torch_mel_spectrogram",
                "in": "w",
                "out": "m",
                "mel_norm_file": str(tmp_path / "missing.pth"),
            }
        )


def test_mel_options_are_checked():
    problems = Problems()
    INJECTORS.get("torch_mel_spectrogram").check_options(
        {"n_mel": 80, "hop_length": "x"}, "steps.s.injectors.mel", problems, None
    )
    found = dict(problems.items)
    assert "did you mean 'n_mels'" in found["steps.s.injectors.mel.n_mel"]
    assert "expected int" in found["steps.s.injectors.mel.hop_length"]


def test_mel_for_each_conditioning():
    cond = torch.randn(2, 3, 2048) * 0.1  # [B, N, L]
    inj = build(
        {"type": "for_each", "subtype": "torch_mel_spectrogram", "in": "cond", "out": "cond_mel"}
    )
    out = inj({"cond": cond})["cond_mel"]
    assert out.shape == (2, 3, 80, 2048 // 256 + 1)
    assert torch.allclose(out[:, 1], reference_mel(cond[:, 1]), atol=1e-5)


def ramp(batch, length):
    """wav[b, t] = 1000 * b + t + 1: every value says where it came from (0 = padding)."""
    return (torch.arange(length)[None] + 1 + 1000 * torch.arange(batch)[:, None]).float()


def test_random_crop_lengths_and_content():
    wav = ramp(4, 100)
    lengths = torch.tensor([100, 50, 10, 30])
    inj = build(
        {
            "type": "random_audio_crop",
            "crop_size": 20,
            "in": ["wav", "len"],
            "out": ["crop", "crop_len"],
        }
    )
    torch.manual_seed(0)
    out = inj({"wav": wav, "len": lengths})
    crop, crop_len = out["crop"], out["crop_len"]
    assert crop.shape == (4, 20) and crop_len.tolist() == [20, 20, 10, 20]
    for b in range(4):
        valid = crop[b, : crop_len[b]]
        start = int(valid[0]) - 1000 * b - 1
        assert 0 <= start <= max(int(lengths[b]) - 20, 0)
        assert torch.equal(valid, wav[b, start : start + len(valid)])  # a contiguous slice
        assert valid.max() <= 1000 * b + lengths[b]  # never past the true length
    assert torch.all(crop[2, 10:] == 0)  # shorter than crop_size: zero-padded


def test_random_crop_follows_global_rng():
    wav = ramp(8, 20000)
    inj = build({"type": "random_audio_crop", "crop_size": 100, "in": "wav", "out": "crop"})
    torch.manual_seed(3)
    first = inj({"wav": wav})["crop"]
    torch.manual_seed(3)
    assert torch.equal(inj({"wav": wav})["crop"], first)
    torch.manual_seed(4)
    assert not torch.equal(inj({"wav": wav})["crop"], first)
    assert set(inj({"wav": wav})) == {"crop"}
    three_d = inj({"wav": wav[:, None]})["crop"]  # [B, 1, T] keeps its channel dim
    assert three_d.shape == (8, 1, 100)


def test_random_crop_bad_options():
    with pytest.raises(ValueError, match="crop_size must be >= 1"):
        build({"type": "random_audio_crop", "crop_size": 0, "in": "wav", "out": "crop"})
    with pytest.raises(ValueError, match="as many keys"):
        build({"type": "random_audio_crop", "crop_size": 10, "in": ["wav", "len"], "out": "crop"})
    problems = Problems()
    INJECTORS.get("random_audio_crop").check_options({}, "p", problems, None)
    assert "p.crop_size" in dict(problems.items)


# ------------------------------------------------------------- DLAS option names and golden
DLAS_DEFAULTS = {
    "filter_length": 1024,
    "hop_length": 256,
    "win_length": 1024,
    "n_mel_channels": 80,
    "mel_fmin": 0,
    "mel_fmax": 8000,
    "sampling_rate": 22050,
    "normalize": False,
    "true_normalization": False,
}


def test_mel_takes_dlas_option_names():
    torch.manual_seed(2)
    wav = torch.randn(2, 6000) * 0.1
    dlas = build({"type": "torch_mel_spectrogram", "in": "w", "out": "m", **DLAS_DEFAULTS})
    assert torch.allclose(dlas({"w": wav})["m"], reference_mel(wav), atol=1e-5)
    small = {"n_mel_channels": 40, "sampling_rate": 16000, "filter_length": 512, "mel_fmax": 7000}
    ours = {"n_mels": 40, "sample_rate": 16000, "n_fft": 512, "f_max": 7000}
    a = build({"type": "torch_mel_spectrogram", "in": "w", "out": "m", **small})({"w": wav})
    b = build({"type": "torch_mel_spectrogram", "in": "w", "out": "m", **ours})({"w": wav})
    assert a["m"].shape == (2, 40, 6000 // 256 + 1) and torch.equal(a["m"], b["m"])

    problems = Problems()
    INJECTORS.get("torch_mel_spectrogram").check_options(
        {"n_mels": 80, "n_mel_channels": 80}, "steps.s.injectors.mel", problems, None
    )
    found = dict(problems.items)
    assert "DLAS's name for 'n_mels'" in found["steps.s.injectors.mel.n_mel_channels"]


def test_mel_normalize_and_true_normalization():
    torch.manual_seed(3)
    wav = torch.randn(1, 6000) * 0.1
    base = {"type": "torch_mel_spectrogram", "in": "w", "out": "m"}
    plain = build(base)({"w": wav})["m"]
    true = build({**base, "true_normalization": True})({"w": wav})["m"]
    assert torch.allclose(true, 2 * (plain + 11.5129) / (4.82 + 11.5129) - 1, atol=1e-6)
    normalized = build({**base, "normalize": True})({"w": wav})["m"]
    window = torch.hann_window(1024)
    # torchaudio's normalized STFT divides the magnitude by the window's L2 norm
    # (power) -> log: a constant shift, wherever both stay above the 1e-5 floor
    above = plain > -4.0
    shift = normalized[above] - plain[above]
    assert above.sum() > 100
    assert torch.allclose(shift, -torch.log(window.pow(2).sum()).expand_as(shift), atol=1e-4)
    with pytest.raises(ValueError, match="needs log: true"):
        build({**base, "true_normalization": True, "log": False})


def test_mel_golden_dlas_outputs():
    """DLAS's TorchMelSpectrogramInjector outputs (shared/golden/tortoise/mel_io.safetensors),
    with and without the golden mel_norms.pth; see scripts/golden_dvae_mel.py."""
    golden = load_script("golden_dvae_mel")
    rows = golden.mel_rows()
    assert [r.name for r in rows] == ["mel_1s", "mel_2s", "mel_1s_nonorm", "mel_2s_nonorm"]
    assert all(r.ok for r in rows), golden.table(rows)
