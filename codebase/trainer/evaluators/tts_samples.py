"""``tts_samples``: speak a few held-out items during training, save, log and score them.

YAML::

    eval:
      every: 1000
      evaluators:
        samples: {type: tts_samples, dataset: val, num_samples: 4}

Every evaluation generates the same first ``num_samples`` items of the dataset (same phonemes,
same prompt, same seed), so the audio and the curves are comparable across steps. Per item it
writes ``samples/<step>/<id>.wav``, ``<id>_ref.wav`` (the reference codes decoded by the same
codec), ``<id>.png`` and ``<id>_ref.png`` (log-mels), logs audio and mel images under
``samples/<id>``, and returns:

- ``mel_stft``: auraloss' multi-term mel STFT distance between the generated and reference
  waveforms (the generated one cut or zero-padded to the reference length); lower is better.
- ``duration_ratio``: generated / reference duration; near 1 once the model learns to stop.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import torch
from torch import nn

from models.audio.tts.synthesis import build_codec_from_config, decode_codes, generate_codes
from trainer.evaluators import Evaluator

# STFT settings of the score (auraloss' MelSTFTLoss defaults but 80 mels: with 128 mels at
# 16 kHz and a 1024-point FFT some low mel filters would be empty).
_FFT, _HOP, _N_MELS = 1024, 256, 80


class TtsSamplesEvaluator(Evaluator):
    """Generate speech for the first items of a dataset, save and log it, score it.

    Args:
        network: the VALL-E network to sample from (its EMA copy when there is one).
        dataset: the dataset phase whose items are spoken: an ``hdf5_codes`` dataset (items
            with codes, phonemes, prompt, id; ``codec_config`` from its data file).
        num_samples: how many items (the first N, the same every time).
        max_duration_factor: stop generating at this many times the reference length.
        temperature: AR sampling temperature.
        top_k: AR top-k sampling (0: off).
        top_p: AR nucleus sampling (1: off).
        repetition_penalty: AR repetition penalty (1: off).
        nar_temperature: NAR sampling temperature (0: greedy).
        seed: sampling seed, fixed so evaluations differ only by the weights.
        codec_options: overrides of the data file's codec config (e.g. a moved ``checkpoint``).
    """

    runtime_args = ("networks", "env", "datasets", "logger")

    def __init__(self, network: str = "valle", dataset: str = "val", num_samples: int = 4,
                 max_duration_factor: float = 2.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0,
                 nar_temperature: float = 0.0, seed: int = 0,
                 codec_options: dict[str, Any] | None = None, networks: Any = None,
                 env: Any = None, datasets: Any = None, logger: Any = None) -> None:
        super().__init__()
        if network not in networks:
            raise ValueError(f"tts_samples: no network {network!r}; the networks are "
                             f"{sorted(networks)} (set `network:`)")
        if dataset not in datasets:
            raise ValueError(f"tts_samples: no dataset phase {dataset!r}; the datasets are "
                             f"{sorted(datasets)} (add datasets.{dataset} or set `dataset:`)")
        if num_samples < 1 or max_duration_factor <= 0:
            raise ValueError(f"tts_samples: need num_samples >= 1 and max_duration_factor > 0, "
                             f"got {num_samples} and {max_duration_factor}")
        data = datasets[dataset]
        self.codec_config = _codec_config(data, dataset)
        if not callable(getattr(networks[network], "generate", None)):
            raise ValueError(f"tts_samples: network {network!r} "
                             f"({type(networks[network]).__name__}) has no generate()")
        self.network, self.dataset_phase = network, dataset
        self.num_samples = min(num_samples, len(data))
        self.max_duration_factor = max_duration_factor
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty,
                             nar_temperature=nar_temperature, seed=seed)
        self.codec_options = dict(codec_options or {})
        # Plain attributes, not submodules: they belong to the trainer, not to this evaluator.
        self.__dict__.update(networks=networks, env=env, datasets=datasets, logger=logger)
        self._codec: nn.Module | None = None
        self._loss: nn.Module | None = None
        self._refs: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------------- lazy parts

    def codec(self) -> nn.Module:
        if self._codec is None:  # built at the first evaluation, not at start-up
            codec = build_codec_from_config(self.codec_config, self.codec_options,
                                            where=f"dataset {self.dataset_phase!r}")
            self.__dict__["_codec"] = codec.to(self.env.device).eval()
        return self._codec

    def mel_stft(self) -> nn.Module:
        if self._loss is None:
            self.__dict__["_loss"] = mel_stft_loss(int(self.codec().sample_rate))
        return self._loss

    # ------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        data = self.datasets[self.dataset_phase]
        items = [data[j] for j in range(self.num_samples)]
        model = self.networks[self.network]
        codec = self.codec()
        n_levels = int(getattr(model, "n_levels", items[0]["codes"].shape[0]))
        ref_codes = [it["codes"][:n_levels] for it in items]
        limits = [max(1, math.ceil(self.max_duration_factor * c.shape[-1])) for c in ref_codes]
        was_training = model.training
        model.eval()  # the EMA copy is never switched by the trainer: no dropout here
        try:
            codes = generate_codes(model, [it["phonemes"] for it in items],
                                   [it["prompt"][:n_levels] for it in items], max_frames=limits,
                                   device=self.env.device, **self.sampling)
        finally:
            model.train(was_training)
        wavs = decode_codes(codec, codes)
        if self._refs is None:  # the references never change: decode them once
            self.__dict__["_refs"] = decode_codes(codec, ref_codes)
        refs = self._refs

        sr = int(codec.sample_rate)
        folder = self.env.run_dir / "samples" / str(step)
        scores, ratios = [], []
        for it, wav, ref, gen, want in zip(items, wavs, refs, codes, ref_codes):
            name = _safe_name(it["id"])
            scores.append(self._score(wav, ref))
            ratios.append(gen.shape[-1] / max(want.shape[-1], 1))
            self._write(folder, name, wav, ref, sr, step)
        return {"mel_stft": sum(scores) / len(scores),
                "duration_ratio": sum(ratios) / len(ratios)}

    def _score(self, wav: torch.Tensor, ref: torch.Tensor) -> float:
        n = ref.numel()
        wav = wav[:n] if wav.numel() >= n else torch.nn.functional.pad(wav, (0, n - wav.numel()))
        # The STFT reflect-pads by half an FFT: very short clips are zero-padded first.
        pad = max(0, _FFT - n)
        x = torch.nn.functional.pad(wav, (0, pad)).view(1, 1, -1)
        y = torch.nn.functional.pad(ref, (0, pad)).view(1, 1, -1)
        return float(self.mel_stft()(x, y))

    def _write(self, folder, name: str, wav: torch.Tensor, ref: torch.Tensor, sr: int,
               step: int) -> None:
        from utils.audio import save_audio, save_mel_png

        for suffix, audio in (("", wav), ("_ref", ref)):
            mel = _plot_mel(audio, sr)
            save_audio(folder / f"{name}{suffix}.wav", audio, sr)
            save_mel_png(folder / f"{name}{suffix}.png", mel,
                         title=f"{name}{suffix} (step {step})")
            if self.logger is not None:
                if audio.numel():
                    self.logger.log_audio(f"samples/{name}{suffix}", audio, sr, step)
                self.logger.log_image(f"samples/{name}{suffix}_mel", mel_image(mel), step)


def mel_stft_loss(sample_rate: int) -> nn.Module:
    """auraloss' ``MelSTFTLoss`` (spectral convergence + log magnitude on mel bins).

    auraloss builds its mel filters with librosa, a heavy optional dependency; torchaudio's
    Slaney filters are the same matrix (librosa's defaults), so they are put in its place.
    """
    import torchaudio.functional as AF
    from auraloss.freq import STFTLoss

    loss = STFTLoss(fft_size=_FFT, hop_size=_HOP, win_length=_FFT, sample_rate=sample_rate)
    fb = AF.melscale_fbanks(_FFT // 2 + 1, 0.0, sample_rate / 2, _N_MELS, sample_rate,
                            norm="slaney", mel_scale="slaney")  # [freqs, mels]
    loss.scale, loss.n_bins = "mel", _N_MELS
    loss.register_buffer("fb", fb.t().unsqueeze(0).contiguous())  # [1, mels, freqs]
    return loss


def _plot_mel(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    from utils.audio import mel_spectrogram

    # mel_spectrogram's centred STFT needs more than half an FFT of samples.
    wav = torch.nn.functional.pad(wav, (0, max(0, 1025 - wav.numel())))
    return mel_spectrogram(wav, sample_rate)  # [n_mels, frames]


def mel_image(mel: torch.Tensor) -> torch.Tensor:
    """Log-mel [n_mels, frames] -> HWC float image in [0, 1] (viridis, low bins at the bottom)."""
    import matplotlib

    lo, hi = float(mel.min()), float(mel.max())
    norm = (mel - lo) / max(hi - lo, 1e-5)
    rgba = matplotlib.colormaps["viridis"](norm.flip(0).numpy())
    return torch.from_numpy(rgba[..., :3]).float()


def _codec_config(data: Any, phase: str) -> dict[str, Any]:
    config = getattr(data, "codec_config", None)
    if config is None and "codec" in getattr(data, "attrs", {}):
        config = json.loads(data.attrs["codec"])
    if not isinstance(config, dict):
        raise ValueError(f"tts_samples: dataset {phase!r} ({type(data).__name__}) has no codec "
                         f"config; it needs an hdf5_codes dataset (a prepared data.h5)")
    return config


def _safe_name(item_id: Any) -> str:
    return re.sub(r"[^\w.-]", "_", str(item_id)) or "item"
