"""What every TTS evaluator shares, whatever the model family: speak held-out items, score,
write and log them, and compare evaluations.

A subclass (``tts_samples`` for VALL-E, ``tortoise_samples`` for Tortoise's GPT) says how its
model is scored teacher-forced, how it speaks a batch of items and how an item's reference is
decoded; this base picks the items, scores the free-running output the same way for every
family (duration ratio, unaligned mel STFT distance, DTW distance to the own reference against
the other references of the same voice, own-closest rate against chance; see
:mod:`trainer.evaluators.speech_metrics`), writes ``samples/<step>/<id>.wav`` / ``<id>_ref.wav``
with their mel images, logs them to TensorBoard under ``samples/<id>``, and keeps every
evaluation's figures for the end-of-run report.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from trainer.component import TrainerEnv
from trainer.evaluators.base import TrackedEvaluator, check_network_and_dataset
from trainer.evaluators.speech_metrics import (
    VoiceProfile,
    closest_reference,
    voice_match,
    voice_profile,
)
from trainer.logger import mel_image
from utils.audio import mel_spectrogram, save_audio, save_mel_png
from utils.registry import component_name

# STFT settings of the score (auraloss' MelSTFTLoss defaults but 80 mels: with 128 mels at
# 16 kHz and a 1024-point FFT some low mel filters would be empty).
_FFT, _HOP, _N_MELS = 1024, 256, 80

# (scalar, label) rows of the free-running figures, in report order.
FREE_RUNNING_ROWS = (
    ("duration_ratio", "free-running duration / reference"),
    ("dtw_own", "DTW mel distance to own reference"),
    ("dtw_others", "  to other refs of the same voice"),
    ("own_closest", "own reference is the closest"),
    ("own_closest_chance", "  chance level"),
    ("mel_stft", "mel STFT distance (unaligned)"),
    # with voice_references
    ("voice_closest", "output nearest to its own voice"),
    ("voice_closest_chance", "  chance level"),
    ("voice_dist_own", "spectral distance to own voice"),
    ("voice_dist_other", "  to the nearest other voice"),
    ("pitch_out", "median pitch of outputs (Hz)"),
    ("pitch_own", "  of the own voice's references"),
    ("pitch_error", "pitch error to own voice (semitones)"),
    ("pitch_error_other", "  to the nearest other voice"),
)


class SpeechSamplesEvaluator(TrackedEvaluator):
    """Base of the TTS evaluators (see the module docstring).

    Args:
        network: the network to sample from (its EMA copy when there is one).
        dataset: the dataset phase whose items are spoken.
        num_samples: how many items are generated (in turn from each speaker, the same every
            time).
        teacher_forced_items: how many items (the first N) get the teacher-forced scores
            (0: none).
        reference_items: how many items (the first N) are decoded as references that the
            outputs are compared with by DTW (0: none). Every generated item's own reference is
            always included.
        batch_size: items per teacher-forced batch and per generation batch.
        max_duration_factor: stop generating at this many times the reference length.
        voice_references: dataset phases whose items are references of other voices than the
            evaluated dataset's (e.g. the voices a base model was trained on, when fine-tuning
            it on a new one). Given (``[]`` too), each output is also compared with every
            voice: the evaluated dataset's speakers and these datasets' (see
            :func:`trainer.evaluators.speech_metrics.voice_match`). None: no voice figures.
        voice_reference_items: references per voice (its first N items).

    Subclasses implement :meth:`sample_rate`, :meth:`decode_reference`,
    :meth:`teacher_forced` and :meth:`speak`.
    """

    abstract = True
    kind = "evaluator"

    def __init__(
        self,
        network: str,
        dataset: str,
        num_samples: int,
        teacher_forced_items: int,
        reference_items: int,
        batch_size: int,
        max_duration_factor: float,
        voice_references: list[str] | None,
        voice_reference_items: int,
        networks: dict[str, nn.Module],
        env: TrainerEnv,
        datasets: dict[str, Any],
        logger: Any,
    ) -> None:
        super().__init__()
        what = self.registered_name()
        check_network_and_dataset(what, network, dataset, networks, datasets)
        if num_samples < 0 or max_duration_factor <= 0 or batch_size < 1:
            raise ValueError(
                f"{what}: need num_samples >= 0, batch_size >= 1 and max_duration_factor > 0, "
                f"got {num_samples}, {batch_size} and {max_duration_factor}"
            )
        if num_samples == 0 and teacher_forced_items < 1:
            raise ValueError(
                f"{what}: num_samples 0 and teacher_forced_items 0 leave nothing to evaluate"
            )
        for phase in voice_references or []:
            check_network_and_dataset(what, network, phase, networks, datasets)
        if voice_reference_items < 1:
            raise ValueError(
                f"{what}: voice_reference_items must be >= 1, got {voice_reference_items}"
            )
        data = datasets[dataset]
        self.network, self.dataset_phase = network, dataset
        self.speakers = item_speakers(data)
        self.picked = round_robin(self.speakers, min(num_samples, len(data)))
        self.teacher_forced_items = min(max(teacher_forced_items, 0), len(data))
        ref_items = set(range(min(max(reference_items, 0), len(data))))
        self.references = sorted(ref_items | set(self.picked)) if reference_items else []
        self.batch_size = batch_size
        self.max_duration_factor = max_duration_factor
        self.voice_references = None if voice_references is None else list(voice_references)
        self.voice_reference_items = voice_reference_items
        self._voices: dict[str, list[VoiceProfile]] | None = None
        self.networks, self.env, self.datasets, self.logger = networks, env, datasets, logger
        self._loss: nn.Module | None = None
        self._refs: dict[int, torch.Tensor] = {}  # item -> decoded reference waveform
        self._ref_mels: dict[int, torch.Tensor] = {}
        self.history = []

    @classmethod
    def registered_name(cls) -> str:
        return component_name(cls, cls.kind)

    # ------------------------------------------------------------------------- subclass parts

    def sample_rate(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_reference(
        self, index: int, phase: str | None = None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """Item ``index`` of dataset ``phase`` (default: the evaluated one): its reference
        audio [T] (its true codes decoded the way outputs are)."""
        raise NotImplementedError

    def teacher_forced(self, model: nn.Module) -> dict[str, float]:  # pragma: no cover
        """Scalars of the teacher-forced scores over the first ``teacher_forced_items``."""
        raise NotImplementedError

    def speak(
        self, model: nn.Module, indices: list[int], items: list[dict[str, Any]], step: int
    ) -> list[tuple[torch.Tensor, int, int]]:  # pragma: no cover - abstract
        """Per item: (generated audio [T], generated frames, reference frames)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        model = self.networks[self.network]
        was_training = model.training
        model.eval()  # the EMA copy is never switched by the trainer: no dropout here
        try:
            results = self.teacher_forced(model) if self.teacher_forced_items else {}
            if self.picked:
                results.update(self._free_running(model, step))
        finally:
            model.train(was_training)
        self.history.append((step, dict(results)))
        return results

    def batches(self, indices: list[int]) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
        """``indices`` in chunks of ``batch_size``, with their items."""
        data = self.datasets[self.dataset_phase]
        for i in range(0, len(indices), self.batch_size):
            chunk = indices[i : i + self.batch_size]
            yield chunk, [data[j] for j in chunk]

    def frame_limit(self, reference_frames: int) -> int:
        """The most frames generated for an item whose reference has this many."""
        return max(1, math.ceil(self.max_duration_factor * reference_frames))

    def reference(self, j: int) -> torch.Tensor:
        """Item j's decoded reference (once: references never change)."""
        if j not in self._refs:
            self._refs[j] = self.decode_reference(j)
            self._ref_mels[j] = plot_mel(self._refs[j], self.sample_rate())
        return self._refs[j]

    def _free_running(self, model: nn.Module, step: int) -> dict[str, float]:
        sr = self.sample_rate()
        folder = self.samples_folder(step)
        scores, ratios, mels, wavs = [], [], [], []
        for chunk, items in self.batches(self.picked):
            for j, item, (wav, frames, ref_frames) in zip(
                chunk, items, self.speak(model, chunk, items, step)
            ):
                ref = self.reference(j)
                scores.append(self._score(wav, ref))
                ratios.append(frames / max(ref_frames, 1))
                mels.append(plot_mel(wav, sr))
                wavs.append(wav)
                self._write(folder, self.item_name(j, item), wav, ref, sr, step)
        results = {"mel_stft": float(np.mean(scores)), "duration_ratio": float(np.mean(ratios))}
        if self.references:
            for j in self.references:
                self.reference(j)
            position = {j: k for k, j in enumerate(self.references)}
            close = closest_reference(
                mels,
                [self._ref_mels[j] for j in self.references],
                [position[j] for j in self.picked],
                [self.speakers[j] for j in self.references],
            )
            results.update(
                dtw_own=close["own"],
                dtw_others=close["others"],
                own_closest=close["own_closest"],
                own_closest_chance=close["chance"],
            )
        if self.voice_references is not None:
            profiles = [voice_profile(w, m, sr) for w, m in zip(wavs, mels)]
            targets = [self.speakers[j] for j in self.picked]
            results.update(voice_match(profiles, targets, self.voices()))
        return results

    def voices(self) -> dict[str, list[VoiceProfile]]:
        """Voice -> profiles of its first ``voice_reference_items`` references, from the
        evaluated dataset and the ``voice_references`` datasets (once: they never change)."""
        if self._voices is None:
            sr = self.sample_rate()
            self._voices = {}
            for phase in [self.dataset_phase, *self.voice_references]:
                # a speaker name in several datasets is one voice
                for j, speaker in enumerate(item_speakers(self.datasets[phase])):
                    profiles = self._voices.setdefault(speaker, [])
                    if len(profiles) >= self.voice_reference_items:
                        continue
                    if phase == self.dataset_phase:  # decoded once, shared with the DTW scores
                        wav, mel = self.reference(j), self._ref_mels[j]
                    else:
                        wav = self.decode_reference(j, phase)
                        mel = plot_mel(wav, sr)
                    profiles.append(voice_profile(wav, mel, sr))
        return self._voices

    def item_name(self, index: int, item: dict[str, Any]) -> str:
        """A file-safe name of an item: its id, else its audio file's stem."""
        name = item.get("id") or Path(str(item.get("path", f"item{index}"))).stem
        return safe_name(name)

    def _score(self, wav: torch.Tensor, ref: torch.Tensor) -> float:
        if self._loss is None:
            self._loss = mel_stft_loss(self.sample_rate())
        n = ref.numel()
        wav = wav[:n] if wav.numel() >= n else torch.nn.functional.pad(wav, (0, n - wav.numel()))
        # The STFT reflect-pads by half an FFT: very short clips are zero-padded first.
        pad = max(0, _FFT - n)
        x = torch.nn.functional.pad(wav.float().cpu(), (0, pad)).view(1, 1, -1)
        y = torch.nn.functional.pad(ref.float().cpu(), (0, pad)).view(1, 1, -1)
        return float(self._loss(x, y))

    def _write(
        self, folder: Path, name: str, wav: torch.Tensor, ref: torch.Tensor, sr: int, step: int
    ) -> None:
        for suffix, audio in (("", wav), ("_ref", ref)):
            write_sample(self.logger, folder, f"{name}{suffix}", audio, sr, step)

    def samples_folder(self, step: int) -> Path | None:
        """Where ``step``'s wavs go; None when nothing is generated (``num_samples: 0``)."""
        return self.env.run_dir / "samples" / str(step) if self.picked else None


def write_sample(
    logger: Any, folder: Path, name: str, audio: torch.Tensor, sample_rate: int, step: int
) -> None:
    """``<folder>/<name>.wav`` and ``.png`` (log-mel), and both logged under ``samples/<name>``."""
    audio = audio.detach().float().cpu()
    mel = plot_mel(audio, sample_rate)
    save_audio(folder / f"{name}.wav", audio, sample_rate)
    save_mel_png(folder / f"{name}.png", mel, title=f"{name} (step {step})")
    if logger is not None:
        if audio.numel():
            logger.log_audio(f"samples/{name}", audio, sample_rate, step)
        logger.log_image(f"samples/{name}_mel", mel_image(mel), step)


def item_speakers(data: Any) -> list[str]:
    """The speaker of each item of a dataset (a ``speakers`` list or method), or '' for all."""
    speakers = getattr(data, "speakers", None)
    if callable(speakers):
        speakers = speakers()
    return list(speakers) if speakers is not None else [""] * len(data)


def round_robin(speakers: list[str], n: int) -> list[int]:
    """n item indices taken in turn from each speaker (in order of first appearance)."""
    queues: dict[str, list[int]] = {}
    for j, s in enumerate(speakers):
        queues.setdefault(s, []).append(j)
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for q in queues.values():
            if depth < len(q) and len(picked) < n:
                picked.append(q[depth])
        depth += 1
    return picked


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def mel_stft_loss(sample_rate: int) -> nn.Module:
    """auraloss' ``MelSTFTLoss`` (spectral convergence + log magnitude on mel bins).

    auraloss builds its mel filters with librosa, a heavy optional dependency; torchaudio's
    Slaney filters are the same matrix (librosa's defaults), so they are put in its place.
    """
    import torchaudio.functional as AF
    from auraloss.freq import STFTLoss

    loss = STFTLoss(fft_size=_FFT, hop_size=_HOP, win_length=_FFT, sample_rate=sample_rate)
    fb = AF.melscale_fbanks(
        _FFT // 2 + 1, 0.0, sample_rate / 2, _N_MELS, sample_rate, norm="slaney", mel_scale="slaney"
    )  # [freqs, mels]
    loss.scale, loss.n_bins = "mel", _N_MELS
    loss.register_buffer("fb", fb.t().unsqueeze(0).contiguous())  # [1, mels, freqs]
    return loss


def plot_mel(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The log-mel every evaluator compares and draws: [n_mels, frames]."""
    # mel_spectrogram's centred STFT needs more than half an FFT of samples.
    wav = torch.nn.functional.pad(wav, (0, max(0, 1025 - wav.numel())))
    return mel_spectrogram(wav, sample_rate)


def safe_name(item_id: Any) -> str:
    return re.sub(r"[^\w.-]", "_", str(item_id)) or "item"
