"""Audio files in and out (soundfile), resampling, log-mel spectrograms and their PNGs.

Everything here works on mono float32 tensors in [-1, 1]: ``load_audio`` mixes channels down
and resamples, so callers never see a file's own layout.
"""

from __future__ import annotations

import functools
import warnings
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


def griffin_lim(
    magnitude: torch.Tensor,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    n_iter: int = 32,
) -> torch.Tensor:
    """Magnitude spectrogram [B, n_fft // 2 + 1, frames] -> audio [B, frames * hop_length].

    torchaudio's Griffin-Lim (momentum 0.99) from a fixed random phase, so the same spectrogram
    always gives the same audio; the output is clamped to [-1, 1]. Used by every decoder here
    that ends in a mel spectrogram (the ``mel_rvq`` codec, the inverse of
    ``torch_mel_spectrogram``).
    """
    win_length = win_length or n_fft
    frames = magnitude.shape[-1]
    if frames == 0:
        return magnitude.new_zeros(magnitude.shape[0], 0)
    # Griffin-Lim re-analyses its output (reflect-padded by n_fft // 2) each iteration: a clip
    # of 1-2 frames is too short for that, so silent frames lengthen it, cut after.
    padded = max(frames, (n_fft // 2 + 1) // hop_length + 2)
    spec = torch.nn.functional.pad(magnitude.float(), (0, padded - frames))
    window = torch.hann_window(win_length, device=spec.device)
    with (
        torch.random.fork_rng(devices=[spec.device] if spec.is_cuda else []),
        warnings.catch_warnings(),
    ):
        # istft zero-fills the last hop - 1 samples of that length, and says so: intended.
        warnings.filterwarnings("ignore", message="The length of signal is shorter")
        torch.manual_seed(0)
        # The length must give back exactly `padded` centred frames: padded * hop - 1 samples;
        # the result is cut/padded to frames * hop.
        wav = AF.griffinlim(
            spec,
            window,
            n_fft,
            hop_length,
            win_length,
            power=1.0,
            n_iter=n_iter,
            momentum=0.99,
            length=padded * hop_length - 1,
            rand_init=True,
        )
    return torch.nn.functional.pad(wav, (0, 1))[:, : frames * hop_length].clamp(-1.0, 1.0)


def invert_mel(
    power_mel: torch.Tensor, transform: MelSpectrogram, n_iter: int = 32
) -> torch.Tensor:
    """Power mel [B, n_mels, frames] made by ``transform`` -> audio [B, frames * hop].

    The linear spectrogram is the minimum-norm least-squares inverse of the transform's own
    filterbank (its pseudo-inverse; negatives clipped, as torchaudio's ``InverseMelScale``
    does, whose default CPU ``lstsq`` driver returns zeros for this rank-deficient system),
    and the phase comes from :func:`griffin_lim`.
    """
    fb = transform.mel_scale.fb.to(power_mel.device, torch.float32)  # [freqs, n_mels]
    mel = power_mel.float().clamp(min=0)
    power = (torch.linalg.pinv(fb.t()) @ mel).clamp(min=0)  # [B, freqs, frames]
    stft = transform.spectrogram
    if stft.normalized:  # torchaudio divided the STFT by the window's norm
        power = power * stft.window.pow(2).sum().to(power)
    return griffin_lim(power.sqrt(), stft.n_fft, stft.hop_length, stft.win_length, n_iter)


# true_normalization maps the log-mel range [log 1e-5, 4.82] (Tortoise's TacotronSTFT bounds)
# to [-1, 1].
TRUE_NORM_MIN = -11.5129
TRUE_NORM_MAX = 4.82


class DlasMel(torch.nn.Module):
    """DLAS/Tortoise's mel features and their inverse: wav [B, T] -> mel [B, n_mels, frames]
    (slaney filters, power 2, natural log floored at 1e-5, optionally divided by per-bin norms
    and mapped to [-1, 1] with ``true_normalization``), and back to audio by Griffin-Lim.

    ``config()`` is a JSON-able description (norms included) that ``from_config`` rebuilds,
    so a checkpoint can carry the exact features a model was trained on.
    """

    def __init__(
        self,
        sample_rate: int = 22050,
        n_mels: int = 80,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int | None = None,
        f_min: float = 0.0,
        f_max: float | None = 8000.0,
        mel_norms: torch.Tensor | None = None,
        log: bool = True,
        normalize: bool = False,
        true_normalization: bool = False,
    ) -> None:
        super().__init__()
        if true_normalization and not log:
            raise ValueError("true_normalization rescales the log-mel; it needs log: true")
        self.mel = mel_transform(
            sample_rate, n_mels, n_fft, hop_length, win_length, f_min, f_max, normalize
        )
        self.log, self.normalize, self.true_normalization = log, normalize, true_normalization
        norms = None if mel_norms is None else torch.as_tensor(mel_norms).reshape(-1).float()
        self.register_buffer("mel_norms", norms, persistent=False)

    @property
    def sample_rate(self) -> int:
        return int(self.mel.sample_rate)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, T] -> mel [B, n_mels, T // hop + 1], in float32 even under autocast (the log
        of tiny half-precision powers underflows to -inf)."""
        with torch.autocast(device_type=wav.device.type, enabled=False):
            mel = self.mel(wav.float())
            if self.log:
                mel = log_mel(mel)
            if self.mel_norms is not None:
                mel = mel / self.mel_norms[None, :, None]
            if self.true_normalization:
                mel = 2 * (mel - TRUE_NORM_MIN) / (TRUE_NORM_MAX - TRUE_NORM_MIN) - 1
        return mel

    @torch.no_grad()
    def to_audio(self, mel: torch.Tensor, n_iter: int = 32) -> torch.Tensor:
        """The inverse: mel [B, n_mels, frames] as :meth:`forward` makes it -> audio
        [B, frames * hop_length], undoing ``true_normalization``, the norms and the log, then
        Griffin-Lim (:func:`invert_mel`). Far below a vocoder, enough to hear the words."""
        x = mel.detach().float()
        if self.true_normalization:
            x = (x + 1) / 2 * (TRUE_NORM_MAX - TRUE_NORM_MIN) + TRUE_NORM_MIN
        if self.mel_norms is not None:
            x = x * self.mel_norms.to(x)[None, :, None]
        power = torch.exp(x) if self.log else x
        return invert_mel(power, self.mel, n_iter)

    def config(self) -> dict:
        m = self.mel
        return {
            "sample_rate": int(m.sample_rate),
            "n_mels": int(m.n_mels),
            "n_fft": int(m.n_fft),
            "hop_length": int(m.hop_length),
            "win_length": int(m.win_length),
            "f_min": float(m.f_min),
            "f_max": None if m.f_max is None else float(m.f_max),
            "mel_norms": None if self.mel_norms is None else self.mel_norms.cpu().tolist(),
            "log": self.log,
            "normalize": self.normalize,
            "true_normalization": self.true_normalization,
        }

    @classmethod
    def from_config(cls, config: dict) -> DlasMel:
        return cls(**config)


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
