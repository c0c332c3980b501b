"""Codec injectors: ``audio_to_codes`` (wav -> codec codes) and ``codes_to_audio`` (back).

Both build their codec once per (name, options, device) and share it: an experiment that
encodes in one step and decodes in another holds one copy of the weights. The codec is frozen,
in eval mode, outside autocast (codes must not depend on the training precision), and is not
a child module of the injector, so the trainer never moves, casts or saves it.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchaudio.functional as AF

from models.audio.codecs import CODECS, Codec, build_codec
from trainer.component import ComponentSpec, TrainerEnv
from trainer.injectors.base import Injector
from utils.registry import component_name
from utils.schema import Problems, Runtime, bind_options

# (name, options as sorted JSON, device) -> codec, alive while an injector holds it.
_SHARED: weakref.WeakValueDictionary[tuple[str, str, str], Codec] = weakref.WeakValueDictionary()


def shared_codec(name: str, options: dict[str, Any], device: torch.device | str) -> Codec:
    """The codec ``name`` built with ``options`` on ``device``, one instance per distinct
    combination: frozen and in eval mode."""
    key = (name, json.dumps(options, sort_keys=True, default=str), str(torch.device(device)))
    codec = _SHARED.get(key)
    if codec is None:
        codec = build_codec(name, **options).to(device).eval().requires_grad_(False)
        _SHARED[key] = codec
    return codec


class _CodecInjector(Injector):
    """Shared options and checks of the two codec injectors.

    Args:
        codec: a registered codec (``encodec``, ``vocos``, ``dac``, ``mel_rvq`` ...).
        codec_options: the codec's own options (``bandwidth``, ``pretrained`` ...).
        sample_rate: the rate of the state's audio, when it is not the codec's: audio is
            resampled on the way in (``audio_to_codes``) or out (``codes_to_audio``).
    """

    abstract = True
    _what: ClassVar[str] = "input"  # what the first `in` key holds, for error messages

    def __init__(
        self,
        env: Runtime[TrainerEnv],
        codec: str,
        codec_options: dict[str, Any] | None = None,
        sample_rate: int | None = None,
    ) -> None:
        super().__init__()
        if sample_rate is not None and sample_rate <= 0:
            raise ValueError(
                f"{component_name(type(self), self.kind)}: sample_rate must be "
                f"positive, got {sample_rate}"
            )
        self.device = torch.device(env.device)
        # object.__setattr__ keeps the shared codec out of this module's children (see above).
        object.__setattr__(
            self, "codec", shared_codec(codec, dict(codec_options or {}), self.device)
        )
        self.sample_rate = sample_rate or self.codec.sample_rate

    def _where(self) -> str:
        """The YAML path once built by the trainer, else the injector's name."""
        return getattr(self, "path", None) or component_name(type(self), self.kind)

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path) -> dict:
        kwargs = super().check_options(options, path, problems, base_dir)
        # The codec's options are its constructor's keyword arguments: check them now, with
        # every other problem, instead of failing when the codec is built.
        name = kwargs.get("codec")
        if name is None:
            return kwargs
        try:
            codec_cls = CODECS.get(name)
        except KeyError as e:
            problems.add(f"{path}.codec", str(e))
            return kwargs
        kwargs["codec_options"] = bind_options(
            codec_cls,
            kwargs.get("codec_options") or {},
            f"{path}.codec_options",
            problems,
            base_dir=base_dir,
        )
        return kwargs

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        if not 1 <= len(self.inputs) <= 2 or len(self.outputs) not in (1, len(self.inputs)):
            raise ValueError(
                f"{self._where()}: `in` is the {self._what} "
                f"and optionally its lengths; `out` is one key, or two when `in` "
                f"has lengths (got in={self.inputs}, out={self.outputs})"
            )

    def _run(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return fn(x.to(self.device))


def _scaled(lengths: torch.Tensor, new: int, old: int) -> torch.Tensor:
    """Lengths after resampling from ``old`` to ``new`` Hz (torchaudio's ceil rounding)."""
    return (lengths.long() * new + old - 1) // old


class AudioToCodesInjector(_CodecInjector):
    """Audio ``[B, T]`` or ``[B, 1, T]`` -> codes ``[B, n_levels, frames]`` (long).

    ``in``: the audio key, then optionally its lengths ``[B]`` in samples; ``out``: the codes
    key, then (with lengths in) the code lengths ``[B]`` in frames. Frames past an item's
    length encode the batch's zero padding.
    """

    _what: ClassVar[str] = "audio"

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        wav = state[self.inputs[0]]
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(
                f"{self._where()}: {self.inputs[0]!r} must be mono audio [B, T] or "
                f"[B, 1, T], got shape {tuple(wav.shape)}"
            )
        rate = self.codec.sample_rate
        wav = wav.to(self.device, torch.float32)  # resample where the codec runs
        if self.sample_rate != rate:
            wav = AF.resample(wav, self.sample_rate, rate)
        codes = self._run(self.codec.encode, wav)
        out = {self.outputs[0]: codes}
        if len(self.outputs) == 2:
            lengths = _scaled(state[self.inputs[1]], rate, self.sample_rate)
            frames = [self.codec.frames_for(int(n)) for n in lengths.tolist()]
            out[self.outputs[1]] = torch.tensor(frames, dtype=torch.long, device=codes.device)
        return out


class CodesToAudioInjector(_CodecInjector):
    """Codes ``[B, n_levels, frames]`` -> audio ``[B, T]`` (float, at ``sample_rate``).

    ``in``: the codes key, then optionally their lengths ``[B]`` in frames; ``out``: the audio
    key, then (with lengths in) the audio lengths ``[B]`` in samples. With lengths, codes past
    each length (padding ids) are replaced by 0 before decoding and the audio there is zeroed.
    """

    _what: ClassVar[str] = "codes"

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        codes = state[self.inputs[0]]
        if codes.dim() != 3:
            raise ValueError(
                f"{self._where()}: {self.inputs[0]!r} must be codes [B, n_levels, "
                f"frames], got shape {tuple(codes.shape)}"
            )
        lengths = state[self.inputs[1]].long().to(codes.device) if len(self.inputs) == 2 else None
        if lengths is not None:
            valid = torch.arange(codes.shape[-1], device=codes.device) < lengths[:, None]
            codes = codes.masked_fill(~valid[:, None, :], 0)
        wav = self._run(self.codec.decode, codes)  # [B, frames * hop]
        hop = wav.shape[-1] // max(codes.shape[-1], 1)
        rate = self.codec.sample_rate
        if self.sample_rate != rate:
            wav = AF.resample(wav, rate, self.sample_rate)
        out = {self.outputs[0]: wav}
        if lengths is not None:
            samples = _scaled(lengths.to(wav.device) * hop, self.sample_rate, rate)
            keep = torch.arange(wav.shape[-1], device=wav.device) < samples[:, None]
            out[self.outputs[0]] = wav * keep
            if len(self.outputs) == 2:
                out[self.outputs[1]] = samples
        return out
