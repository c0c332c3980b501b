"""mel_rvq: a codec that needs no download, fitted in seconds on the training audio itself.

A frame is a log-mel vector, normalised per mel bin; residual vector quantisation (RVQ) turns
it into ``n_levels`` codes: level 1 is the nearest k-means centroid of the frame, level 2 the
nearest centroid of what level 1 left over, and so on. Decoding sums the chosen centroids,
undoes the normalisation and inverts the mel spectrogram with Griffin-Lim. Far below a neural
codec in quality, but 80 mels keep the formants and low harmonics, enough to hear the words,
which is what the offline demo needs to train VALL-E without pretrained weights.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
import torchaudio
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.audio.codecs.base import Codec, CodecUnavailable, as_batch, register_codec
from models.audio.codecs.kmeans import fit_rvq, nearest
from utils.audio import griffin_lim
from utils.io import atomic_write

log = logging.getLogger(__name__)

FORMAT = "mel_rvq"
FORMAT_VERSION = "1"
ARCH_KEYS = (
    "sample_rate",
    "n_mels",
    "hop_length",
    "win_length",
    "n_fft",
    "f_min",
    "f_max",
    "n_levels",
    "codebook_size",
)
# log(0) guard, as in most TTS mel front ends: -11.5 is far below any audible bin.
LOG_FLOOR = 1e-5
_HOW_TO_FIT = (
    "mel_rvq must be fitted on audio first: `MelRVQCodec.fit(wavs, out=PATH)` "
    "writes PATH (the data preparation step does this automatically when the codec "
    "is mel_rvq); then set `codec_options: {checkpoint: PATH}`"
)


@register_codec("mel_rvq")
class MelRVQCodec(Codec):
    """Residual k-means over normalised log-mel frames; Griffin-Lim back to audio.

    Args:
        checkpoint: the safetensors file written by :meth:`fit` / :meth:`save`; its stored
            architecture wins over the options below.
        pretrained: False builds random codebooks of the configured shape (tests only).
        sample_rate: Hz of the audio taken and returned.
        n_mels: mel bins per frame (the vector that is quantised).
        hop_length: samples per code frame; 400 at 16 kHz = 40 frames/s, slow enough that
            neighbouring frames differ (at 62.5 frames/s most level-1 codes repeat).
        win_length: analysis window; 1024 (64 ms) resolves harmonics of low voices.
        n_fft: FFT size (>= win_length).
        f_min: lowest mel filter edge in Hz.
        f_max: highest mel filter edge in Hz (None: Nyquist).
        n_levels: residual codebooks per frame.
        codebook_size: entries per codebook.
        griffin_lim_iters: Griffin-Lim iterations in :meth:`decode` (more: cleaner, slower).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        pretrained: bool = True,
        sample_rate: int = 16000,
        n_mels: int = 80,
        hop_length: int = 400,
        win_length: int = 1024,
        n_fft: int = 1024,
        f_min: float = 0.0,
        f_max: float | None = 8000,
        n_levels: int = 4,
        codebook_size: int = 256,
        griffin_lim_iters: int = 32,
    ) -> None:
        super().__init__()
        arch = dict(
            sample_rate=sample_rate,
            n_mels=n_mels,
            hop_length=hop_length,
            win_length=win_length,
            n_fft=n_fft,
            f_min=f_min,
            f_max=f_max,
            n_levels=n_levels,
            codebook_size=codebook_size,
        )
        tensors: dict[str, torch.Tensor] | None = None
        path: Path | None = None
        if not pretrained and checkpoint:
            log.warning("mel_rvq: pretrained=False, so checkpoint %s is not loaded", checkpoint)
        if pretrained:
            path = _checkpoint_path(checkpoint)
            file_arch, tensors = read_checkpoint(path)
            _warn_ignored(arch, file_arch, path)
            arch = file_arch
        _check_arch(arch)
        if griffin_lim_iters < 0:
            raise ValueError(f"mel_rvq: griffin_lim_iters must be >= 0, got {griffin_lim_iters}")

        self.arch = arch
        self.checkpoint = path
        self.pretrained = pretrained
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.sample_rate = int(arch["sample_rate"])
        self.hop_length = int(arch["hop_length"])
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_levels = int(arch["n_levels"])
        self.codebook_size = int(arch["codebook_size"])
        a = arch
        # power=1 (magnitude): log-magnitude mels are what Griffin-Lim below inverts.
        # pad_mode="constant": reflect padding fails on clips shorter than n_fft // 2.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=a["sample_rate"],
            n_fft=a["n_fft"],
            win_length=a["win_length"],
            hop_length=a["hop_length"],
            f_min=a["f_min"],
            f_max=a["f_max"],
            n_mels=a["n_mels"],
            power=1.0,
            center=True,
            pad_mode="constant",
        )
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=a["n_fft"] // 2 + 1,
            n_mels=a["n_mels"],
            sample_rate=a["sample_rate"],
            f_min=a["f_min"],
            f_max=a["f_max"],
        )
        self.register_buffer("window", torch.hann_window(a["win_length"]), persistent=False)
        # Per-bin normalisation of log-mels, so every bin weighs the same in k-means distances.
        self.register_buffer("mean", torch.zeros(a["n_mels"]))
        self.register_buffer("std", torch.ones(a["n_mels"]))
        # [n_levels, codebook_size, n_mels]
        self.register_buffer(
            "codebooks", _random_codebooks(self.n_levels, self.codebook_size, a["n_mels"])
        )
        for name, tensor in (tensors or {}).items():  # shapes checked by read_checkpoint
            getattr(self, name).copy_(tensor)

    # ------------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        wavs: Iterable[torch.Tensor],
        out: str | Path | None = None,
        *,
        max_frames: int = 200_000,
        iters: int = 20,
        seed: int = 0,
        **options: Any,
    ) -> MelRVQCodec:
        """Fit normalisation and RVQ codebooks on ``wavs`` (1-d tensors at ``sample_rate``).

        Frames beyond ``max_frames`` are subsampled uniformly (seeded), so memory stays bounded
        on any corpus; the mean/std still see every frame. ``iters`` Lloyd iterations per level
        (200k speech frames, 4 x 256: 20 take ~7.5 s on 2 cores; 10 take ~4.6 s for a held-out
        error only 1% higher).
        ``options`` are the constructor's architecture options. Saves to ``out`` (safetensors)
        when given. Deterministic for a given ``seed``, input order and thread count.
        """
        for bad in ("checkpoint", "pretrained"):
            if bad in options:
                raise TypeError(
                    f"MelRVQCodec.fit() does not take {bad!r}: it fits new "
                    f"codebooks and writes them to `out`"
                )
        if max_frames < 1 or iters < 0:
            raise ValueError(
                f"MelRVQCodec.fit: need max_frames >= 1 and iters >= 0, got "
                f"max_frames={max_frames}, iters={iters}"
            )
        codec = cls(pretrained=False, **options)
        gen = torch.Generator().manual_seed(seed)
        frames, mean, std = codec._sample_frames(wavs, max_frames, gen)
        if frames.shape[0] < codec.codebook_size:
            seconds = codec.codebook_size / codec.frame_rate
            raise ValueError(
                f"MelRVQCodec.fit: got {frames.shape[0]} mel frames but codebook_size is "
                f"{codec.codebook_size}; give at least {seconds:.1f} s of audio or a smaller "
                f"codebook_size"
            )
        codebooks = fit_rvq((frames - mean) / std, codec.n_levels, codec.codebook_size, iters, gen)
        for name, tensor in (("mean", mean), ("std", std), ("codebooks", codebooks)):
            getattr(codec, name).copy_(tensor)
        codec.pretrained = True
        if out is not None:
            codec.save(out)
        return codec

    @torch.no_grad()
    def _sample_frames(
        self, wavs: Iterable[torch.Tensor], max_frames: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frames [<=max_frames, n_mels] log-mel, mean [n_mels], std [n_mels]) over ``wavs``."""
        n_mels = self.arch["n_mels"]
        total = torch.zeros(n_mels, dtype=torch.float64)
        total_sq = torch.zeros(n_mels, dtype=torch.float64)
        count, skipped = 0, 0
        # A uniform sample without replacement: every frame gets a random key and the
        # max_frames smallest keys survive; compacting at 2x bounds memory on any corpus.
        kept, keys = torch.empty(0, n_mels), torch.empty(0)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending_rows = 0
        for i, wav in enumerate(wavs):
            if not isinstance(wav, torch.Tensor) or wav.dim() != 1:
                shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
                raise ValueError(
                    f"MelRVQCodec.fit: item {i} must be a 1-d waveform tensor at "
                    f"{self.sample_rate} Hz, got {shape}"
                )
            if wav.numel() == 0:
                skipped += 1
                continue
            frames = self.log_mel(wav[None].float().cpu())[0].double()  # [F, n_mels]
            total += frames.sum(0)
            total_sq += (frames * frames).sum(0)
            count += frames.shape[0]
            pending.append((frames.float(), torch.rand(frames.shape[0], generator=gen)))
            pending_rows += frames.shape[0]
            if pending_rows >= 2 * max_frames:
                kept, keys = _smallest_keys(kept, keys, pending, max_frames)
                pending, pending_rows = [], 0
        kept, keys = _smallest_keys(kept, keys, pending, max_frames)
        if skipped:
            log.warning("MelRVQCodec.fit: skipped %d empty waveform(s)", skipped)
        if count == 0:
            raise ValueError(
                "MelRVQCodec.fit: no audio given (the iterable was empty or every "
                "waveform had 0 samples)"
            )
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        # A bin that never varies (e.g. above the audio's band) would divide by ~0.
        std = var.sqrt().clamp_min(1e-3)
        return kept, mean.float(), std.float()

    # ------------------------------------------------------------------------ codec

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, T] -> log-mel frames [B, frames, n_mels]."""
        if wav.shape[-1] == 0:
            raise ValueError("mel_rvq: cannot encode an empty waveform (0 samples)")
        mel = self.mel(wav.to(self.window.device, self.window.dtype))  # [B, n_mels, frames]
        return torch.log(mel.clamp_min(LOG_FLOOR)).transpose(1, 2)

    def normalized_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, T] -> per-bin normalised log-mel frames [B, frames, n_mels] (what RVQ codes)."""
        return (self.log_mel(wav) - self.mean) / self.std

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised frames [B, frames, n_mels] -> codes [B, n_levels, frames] (long)."""
        b, f, d = x.shape
        residual = x.reshape(b * f, d)
        codes = []
        for cb in self.codebooks:  # cb [codebook_size, n_mels]
            idx = nearest(residual, cb)  # [B * frames]
            residual = residual - cb[idx]
            codes.append(idx)
        return torch.stack(codes).view(self.n_levels, b, f).transpose(0, 1)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, frames] (the first 1..n_levels levels) -> [B, frames, n_mels]."""
        codes = self._check_codes(codes)
        levels = torch.arange(codes.shape[1], device=codes.device)
        # codebooks[level, code] for every (B, level, frame), summed over levels.
        return self.codebooks[levels[None, :, None], codes].sum(1)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, T] (or [T]) at ``sample_rate`` -> codes [B, n_levels, T // hop + 1] long."""
        wav, added = as_batch(wav, 2)
        codes = self.quantize(self.normalized_mel(wav))
        return codes[0] if added else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, frames] (or 2-d) -> wav [B, frames * hop_length] (or 1-d).

        Fewer than ``n_levels`` levels decode too (coarser). Griffin-Lim starts from a fixed
        random phase, so the same codes always give the same audio.
        """
        codes, added = as_batch(codes, 3)
        x = self.dequantize(codes)  # [B, frames, n_mels]
        if codes.shape[-1] == 0:
            wav = x.new_zeros(codes.shape[0], 0)
            return wav[0] if added else wav
        mel = torch.exp(x * self.std + self.mean).transpose(1, 2)  # [B, n_mels, frames]
        # lstsq has no half-precision kernels; the codec is small, float32 costs nothing.
        spec = self.inverse_mel(mel.float())  # [B, n_fft // 2 + 1, frames] magnitude
        a = self.arch
        wav = griffin_lim(
            spec, a["n_fft"], a["hop_length"], a["win_length"], n_iter=self.griffin_lim_iters
        )
        return wav[0] if added else wav

    def frames_for(self, num_samples: int) -> int:
        """Code frames for ``num_samples`` samples (centred STFT: one frame per hop, plus one)."""
        return num_samples // self.hop_length + 1

    def config(self) -> dict[str, Any]:
        """Options that rebuild this codec (checkpoint None until it is saved)."""
        return {
            "name": "mel_rvq",
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "pretrained": self.pretrained,
            **self.arch,
            "griffin_lim_iters": self.griffin_lim_iters,
        }

    # ------------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """Write mean, std and codebooks to a safetensors file (atomically), config in metadata."""
        path = Path(path).expanduser().resolve()
        tensors = {
            name: getattr(self, name).detach().float().cpu().contiguous()
            for name in ("mean", "std", "codebooks")
        }
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.arch, sort_keys=True),
        }
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self.checkpoint = path
        self.pretrained = True

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_levels:
            raise ValueError(
                f"mel_rvq: codes must be [B, levels, frames] with 1..{self.n_levels}"
                f" levels, got shape {tuple(codes.shape)}"
            )
        if codes.is_floating_point():
            raise TypeError(f"mel_rvq: codes must be integers, got {codes.dtype}")
        codes = codes.long().to(self.codebooks.device)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"mel_rvq: codes must lie in [0, {self.codebook_size}), got values "
                f"in [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes


def _smallest_keys(
    kept: torch.Tensor,
    keys: torch.Tensor,
    pending: list[tuple[torch.Tensor, torch.Tensor]],
    limit: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``pending`` (frames, keys) into ``kept`` and keep the ``limit`` smallest keys."""
    frames = torch.cat([kept] + [f for f, _ in pending])
    all_keys = torch.cat([keys] + [k for _, k in pending])
    if all_keys.numel() <= limit:
        return frames, all_keys
    order = all_keys.topk(limit, largest=False, sorted=True).indices
    return frames[order], all_keys[order]


def _random_codebooks(n_levels: int, k: int, d: int) -> torch.Tensor:
    # Fixed seed: an unfitted codec (pretrained=False) is the same in every process.
    gen = torch.Generator().manual_seed(0)
    # Each residual level is smaller than the last, as in a fitted RVQ.
    scale = 0.5 ** torch.arange(n_levels, dtype=torch.float32)
    return torch.randn(n_levels, k, d, generator=gen) * scale[:, None, None]


# ---------------------------------------------------------------------------- checkpoints


def _checkpoint_path(checkpoint: str | Path | None) -> Path:
    if not checkpoint:
        raise CodecUnavailable(
            f"mel_rvq: no `checkpoint` given. {_HOW_TO_FIT}. Or set "
            f"`pretrained: false` for random codebooks (tests only)."
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CodecUnavailable(f"mel_rvq: checkpoint {path} not found. {_HOW_TO_FIT}.")
    return path.resolve()


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture config, {mean, std, codebooks}) of a file written by MelRVQCodec.save."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"mel_rvq: {path} is not a readable safetensors file ({e}); it may be "
            f"truncated or corrupt, fit it again"
        ) from e
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"mel_rvq: {path} was not written by MelRVQCodec.save (metadata format "
            f"{meta.get('format')!r}, expected {FORMAT!r}); point `checkpoint` at "
            f"a fitted mel_rvq file"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"mel_rvq: {path} has format version {meta.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION!r}; fit it again with this code"
        )
    try:
        arch = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(
            f"mel_rvq: {path} has no readable 'config' metadata ({e}); fit it again"
        ) from e
    if sorted(arch) != sorted(ARCH_KEYS):
        raise ValueError(
            f"mel_rvq: {path} config has keys {sorted(arch)}, expected "
            f"{sorted(ARCH_KEYS)}; fit it again with this code"
        )
    want = {
        "mean": (arch["n_mels"],),
        "std": (arch["n_mels"],),
        "codebooks": (arch["n_levels"], arch["codebook_size"], arch["n_mels"]),
    }
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != want:
        raise ValueError(
            f"mel_rvq: {path} holds tensors {got}, but its config needs {want}; "
            f"the file is corrupt, fit it again"
        )
    return arch, tensors


def _warn_ignored(given: dict[str, Any], stored: dict[str, Any], path: Path) -> None:
    # Only options set away from their default count: an unset option always "differs" from
    # a file fitted with other settings, and that is no reason to warn.
    defaults = {
        name: p.default for name, p in inspect.signature(MelRVQCodec.__init__).parameters.items()
    }
    ignored = {k: v for k, v in given.items() if v != defaults[k] and v != stored[k]}
    if ignored:
        log.warning(
            "mel_rvq: %s was fitted with %s; ignoring the conflicting options %s "
            "(refit to change the architecture)",
            path,
            {k: stored[k] for k in ignored},
            ignored,
        )


def _check_arch(a: dict[str, Any]) -> None:
    problems = [
        f"{k} must be a positive integer, got {a[k]!r}"
        for k in (
            "sample_rate",
            "n_mels",
            "hop_length",
            "win_length",
            "n_fft",
            "n_levels",
            "codebook_size",
        )
        if not isinstance(a[k], int) or isinstance(a[k], bool) or a[k] < 1
    ]
    if not problems:
        nyquist = a["sample_rate"] / 2
        f_max = nyquist if a["f_max"] is None else a["f_max"]
        if a["win_length"] > a["n_fft"]:
            problems.append(f"win_length ({a['win_length']}) must be <= n_fft ({a['n_fft']})")
        if a["hop_length"] >= a["win_length"]:
            # Hann windows that do not overlap cannot be overlap-added back (Griffin-Lim).
            problems.append(
                f"hop_length ({a['hop_length']}) must be < win_length ({a['win_length']})"
            )
        if not 0 <= a["f_min"] < f_max <= nyquist:
            problems.append(
                f"need 0 <= f_min < f_max <= sample_rate / 2 = {nyquist:g}, got "
                f"f_min={a['f_min']}, f_max={a['f_max']}"
            )
    if problems:
        raise ValueError("mel_rvq: bad options: " + "; ".join(problems))
