"""Audio files in and out (soundfile), resampling, log-mel spectrograms and their PNGs.

Everything here works on mono float32 tensors in [-1, 1]: ``load_audio`` mixes channels down
and resamples, so callers never see a file's own layout.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torchaudio.transforms import MelSpectrogram

from utils.errors import DataError
from utils.io import atomic_write


class AudioError(DataError, ValueError):
    """An audio file that cannot be used. ``reason`` is a short category for skip counts
    ("missing file", "unreadable", "empty audio", "non-finite samples").

    Datasets skip such items; a command that meets one (a synthesis prompt) exits with the
    data error code 4."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise AudioError(path, "missing file", "no such file; fix the path in the corpus index")


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """``(frames, sample_rate, channels)`` from the file header, without decoding the samples."""
    path = Path(path)
    _check_exists(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(path, "unreadable", str(e)) from None
    return int(info.frames), int(info.samplerate), int(info.channels)


def load_audio(path: str | Path, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """Read a file as mono float32: ``([T] tensor, rate)``; resampled when ``sample_rate`` is
    given and differs from the file's. Raises :class:`AudioError` for unusable files."""
    path = Path(path)
    _check_exists(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(path, "unreadable", str(e)) from None
    if data.size == 0:
        raise AudioError(path, "empty audio", "the file holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(path, "non-finite samples", "NaN or inf in the signal")
    wav = torch.from_numpy(data).mean(dim=1)  # [T]: channel mean keeps the level of mono files
    if sample_rate is not None and sample_rate != rate:
        wav = AF.resample(wav, rate, sample_rate)
        rate = sample_rate
    return wav, int(rate)


def save_audio(path: str | Path, wav: torch.Tensor, sample_rate: int) -> None:
    """Write 16-bit PCM WAV atomically. ``wav``: [T], or [C, T] with channels first."""
    wav = wav.detach().float().cpu()
    if wav.dim() == 2:
        wav = wav.t()  # soundfile wants [T, C]
    elif wav.dim() != 1:
        raise ValueError(
            f"save_audio({path}): expected a [T] or [C, T] tensor, got shape {list(wav.shape)}"
        )
    data = wav.clamp(-1.0, 1.0).numpy()  # PCM cannot hold |x| > 1: clamp, don't wrap around
    atomic_write(
        Path(path),
        lambda tmp: sf.write(str(tmp), data, int(sample_rate), subtype="PCM_16", format="WAV"),
    )


def mel_transform(
    sample_rate: int,
    n_mels: int = 80,
    n_fft: int = 1024,
    hop_length: int = 256,
    win_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = 8000.0,
    normalized: bool = False,
) -> MelSpectrogram:
    """The power mel transform used everywhere (DLAS/Tortoise settings: slaney-normalised
    filters, power 2). ``f_max`` above Nyquist is lowered to it. ``normalized``: torchaudio's
    STFT normalisation (by the window's norm; DLAS's ``normalize`` option)."""
    nyquist = sample_rate / 2
    return MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=win_length or n_fft,
        f_min=f_min,
        f_max=min(f_max, nyquist) if f_max is not None else None,
        n_mels=n_mels,
        power=2.0,
        normalized=normalized,
        norm="slaney",
    )


@functools.lru_cache(maxsize=8)
def _cached_mel(
    sample_rate: int,
    n_mels: int,
    n_fft: int,
    hop_length: int,
    win_length: int | None,
    f_min: float,
    f_max: float | None,
) -> MelSpectrogram:
    return mel_transform(sample_rate, n_mels, n_fft, hop_length, win_length, f_min, f_max)


def log_mel(power_mel: torch.Tensor) -> torch.Tensor:
    """Natural log with a floor at 1e-5 (silence would otherwise give -inf)."""
    return torch.log(torch.clamp(power_mel, min=1e-5))


def mel_spectrogram(
    wav: torch.Tensor,
    sample_rate: int,
    n_mels: int = 80,
    n_fft: int = 1024,
    hop_length: int = 256,
    win_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = 8000.0,
) -> torch.Tensor:
    """Log-mel of ``wav`` [..., T] -> [..., n_mels, frames] (so [T] gives [n_mels, frames])."""
    transform = _cached_mel(sample_rate, n_mels, n_fft, hop_length, win_length, f_min, f_max)
    with torch.no_grad():
        return log_mel(transform(wav.detach().float().cpu()))


def save_mel_png(path: str | Path, mel: torch.Tensor, title: str = "") -> None:
    """Save a [n_mels, frames] spectrogram as a PNG (no display needed)."""
    # Figure + Agg canvas directly: no pyplot global state, safe in workers and headless runs.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mel = mel.detach().float().cpu()
    if mel.dim() != 2:
        raise ValueError(f"save_mel_png({path}): expected [n_mels, frames], got {list(mel.shape)}")
    width = min(max(4.0, mel.shape[1] / 60), 16.0)
    fig = Figure(figsize=(width, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(mel.numpy(), origin="lower", aspect="auto", interpolation="none")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("frame")
    ax.set_ylabel("mel bin")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(str(tmp), format="png"))
