"""Audio injectors: log-mel spectrograms and random crops of waveforms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.component import ComponentSpec
from trainer.injectors.base import Injector
from utils.audio import DlasMel
from utils.io import load_torch
from utils.schema import PositiveInt, Problems


def load_mel_norms(file: Path, n_mels: int) -> torch.Tensor:
    """Per-bin mel norms [n_mels] from DLAS's ``clips_mel_norms.pth`` (a tensor saved with
    torch.save) or a ``.safetensors`` file with key ``mel_norms``."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(
            f"mel_norm_file {file} does not exist; point mel_norm_file at a "
            f"[n_mels] tensor (.pth or .safetensors) or remove the option"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        if "mel_norms" not in tensors:
            raise ValueError(
                f"mel_norm_file {file} has no tensor 'mel_norms' (keys: "
                f"{sorted(tensors)}); save the norms under that key"
            )
        norms = tensors["mel_norms"]
    else:
        norms = load_torch(file)
    if not isinstance(norms, torch.Tensor) or norms.reshape(-1).shape[0] != n_mels:
        shape = list(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
        raise ValueError(
            f"mel_norm_file {file} holds {shape}, expected a tensor of {n_mels} "
            f"per-bin norms (one per mel channel; check n_mels)"
        )
    norms = norms.reshape(-1).float()
    if not torch.isfinite(norms).all() or (norms == 0).any():
        raise ValueError(
            f"mel_norm_file {file} contains zero or non-finite norms; the mel is divided by them"
        )
    return norms


# DLAS's option names (TorchMelSpectrogramInjector) -> ours; a DLAS YAML runs as written.
DLAS_MEL_NAMES = {
    "filter_length": "n_fft",
    "n_mel_channels": "n_mels",
    "mel_fmin": "f_min",
    "mel_fmax": "f_max",
    "sampling_rate": "sample_rate",
}


class TorchMelSpectrogramInjector(Injector):
    """wav [B, T] or [B, 1, T] -> log-mel [B, n_mels, frames] (DLAS/Tortoise settings:
    slaney mel filters, power 2, natural log floored at 1e-5, optionally / per-bin norms;
    the math is :class:`utils.audio.DlasMel`, which synthesis shares).

    DLAS's option names are accepted as aliases: ``filter_length`` (n_fft), ``n_mel_channels``
    (n_mels), ``mel_fmin`` (f_min), ``mel_fmax`` (f_max), ``sampling_rate`` (sample_rate);
    giving both spellings of one option is an error.

    Args:
        sample_rate: rate of the input audio.
        n_mels, n_fft, hop_length, win_length, f_min, f_max: mel filterbank and STFT settings
            (``win_length`` None: ``n_fft``).
        mel_norm_file: per-bin norms the mel is divided by (DLAS ``clips_mel_norms.pth``;
            ``python -m trainer.mel_norms`` computes one for a dataset).
        log: take the log (false: the power mel).
        normalize: torchaudio's STFT normalisation (``MelSpectrogram(normalized=True)``).
        true_normalization: after the norms, map the log-mel range [-11.5129, 4.82] linearly
            to [-1, 1] (DLAS ``normalize_torch_mel``).
    """

    def __init__(
        self,
        sample_rate: PositiveInt = 22050,
        n_mels: PositiveInt = 80,
        n_fft: PositiveInt = 1024,
        hop_length: PositiveInt = 256,
        win_length: PositiveInt | None = None,
        f_min: float = 0.0,
        f_max: float | None = 8000.0,
        mel_norm_file: Path | None = None,
        log: bool = True,
        normalize: bool = False,
        true_normalization: bool = False,
    ) -> None:
        super().__init__()
        norms = load_mel_norms(mel_norm_file, n_mels) if mel_norm_file is not None else None
        # a submodule, so moving the injector to a device moves the window and filterbank
        self.transform = DlasMel(
            sample_rate,
            n_mels,
            n_fft,
            hop_length,
            win_length,
            f_min,
            f_max,
            norms,
            log,
            normalize,
            true_normalization,
        )

    @property
    def mel(self) -> nn.Module:
        """The power mel transform (torchaudio's MelSpectrogram)."""
        return self.transform.mel

    @property
    def sample_rate(self) -> int:
        return self.transform.sample_rate

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path) -> dict:
        renamed = dict(options)
        for dlas, ours in DLAS_MEL_NAMES.items():
            if dlas not in options:
                continue
            if ours in options:
                problems.add(
                    f"{path}.{dlas}",
                    f"is DLAS's name for {ours!r}, which is also given; keep one of the two",
                )
            renamed[ours] = renamed.pop(dlas)
        return super().check_options(renamed, path, problems, base_dir)

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        wav = state[self.input]
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav.squeeze(1)
        if wav.dim() != 2:
            raise ValueError(
                f"{getattr(self, 'path', 'torch_mel_spectrogram')}: input "
                f"{self.input!r} must be audio [B, T] or [B, 1, T], got shape "
                f"{list(wav.shape)}"
            )
        return {self.output: self.transform(wav)}

    def to_audio(self, mel: torch.Tensor, n_iter: int = 32) -> torch.Tensor:
        """Mel [B, n_mels, frames] as this injector makes it -> audio (Griffin-Lim)."""
        return self.transform.to_audio(mel, n_iter)

    def checkpoint_metadata(self) -> dict[str, str]:
        """The features, for inference from a checkpoint of a model trained on them."""
        return {"mel_spectrogram": json.dumps(self.transform.config())}


class RandomAudioCropInjector(Injector):
    """Crops ``crop_size`` samples from each item at a random offset within its true length
    (zero-padded when shorter). ``in: wav`` or ``in: [wav, wav_lengths]``; ``out`` has as many
    keys: the crops [B, crop_size] (or [B, 1, crop_size]) and, with lengths, their lengths [B].

    Offsets come from torch's global RNG, which the checkpoint saves, so a resumed run draws
    the same crops as an uninterrupted one.
    """

    def __init__(self, crop_size: int) -> None:
        super().__init__()
        if crop_size < 1:
            raise ValueError(f"random_audio_crop: crop_size must be >= 1, got {crop_size}")
        self.crop_size = crop_size

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        if len(self.inputs) not in (1, 2) or len(self.outputs) != len(self.inputs):
            raise ValueError(
                f"random_audio_crop: `in` must be [wav] or [wav, wav_lengths] and "
                f"`out` as many keys; got in={self.inputs}, out={self.outputs}"
            )

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        wav = state[self.inputs[0]]  # [B, T] or [B, C, T]
        batch, total = wav.shape[0], wav.shape[-1]
        if len(self.inputs) == 2:
            lengths = state[self.inputs[1]].to(device=wav.device, dtype=torch.long).clamp(max=total)
        else:
            lengths = torch.full((batch,), total, dtype=torch.long, device=wav.device)
        # offsets uniform in [0, length - crop] per item; drawn on the CPU generator so the
        # stream does not depend on the device
        room = (lengths - self.crop_size).clamp(min=0).cpu()
        offsets = (torch.rand(batch) * (room + 1)).long().clamp(max=room).to(wav.device)
        positions = offsets[:, None] + torch.arange(self.crop_size, device=wav.device)  # [B, crop]
        new_lengths = torch.minimum(lengths, torch.full_like(lengths, self.crop_size))
        valid = torch.arange(self.crop_size, device=wav.device)[None, :] < new_lengths[:, None]
        index = positions.clamp(max=max(total - 1, 0))
        if wav.dim() == 3:
            index = index[:, None, :].expand(-1, wav.shape[1], -1)
            valid = valid[:, None, :]
        cropped = wav.gather(-1, index) * valid  # padding (past the true length) becomes 0
        out = {self.outputs[0]: cropped}
        if len(self.outputs) == 2:
            out[self.outputs[1]] = new_lengths
        return out
