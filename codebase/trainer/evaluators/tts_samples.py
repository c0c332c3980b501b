"""``tts_samples``: speak held-out items during training, save, log and score them.

YAML::

    eval:
      every: 1000
      at_start: true          # also before the first step, for a "before" figure
      evaluators:
        samples: {type: tts_samples, dataset: val, num_samples: 16}

Every evaluation generates the same ``num_samples`` items of the dataset (taken in turn from
each speaker; same phonemes, prompt and seed), so audio and curves are comparable across steps.
Per item it writes ``samples/<step>/<id>.wav``, ``<id>_ref.wav`` (the reference codes decoded
by the same codec), ``<id>.png`` and ``<id>_ref.png`` (log-mels), and logs the audio and mel
images under ``samples/<id>``. The scalars it returns (logged as ``eval/<scalar>``):

- teacher-forced, over the dataset's items (see :mod:`trainer.evaluators.speech_metrics`):
  ``tf_loss_ar``, ``tf_loss_nar``, ``tf_acc_ar`` with ``tf_acc_ar_repeat_baseline`` (predict
  the previous code) on the same frames, ``tf_acc_ar_changes`` (frames whose code differs from
  the previous one), ``tf_change_fraction``, ``tf_acc_nar``;
- free-running: ``duration_ratio`` (generated / reference duration; near 1 once the model
  learns to stop), ``mel_stft`` (auraloss' mel STFT distance to the reference, lower is
  better), ``dtw_own`` / ``dtw_others`` (mel distance after DTW to the own reference / to the
  other references of the same voice), ``own_closest`` (fraction of outputs nearest to their
  own reference) next to ``own_closest_chance``.

:meth:`TtsSamplesEvaluator.report` compares the first and the latest evaluation in words; the
trainer prints it at the end of training.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from models.audio.tts.synthesis import (
    build_codec_from_config,
    decode_codes,
    generate_codes,
)
from trainer.component import TrainerEnv
from trainer.evaluators.base import Evaluator
from trainer.evaluators.speech_metrics import (
    TF_SUMS,
    closest_reference,
    teacher_forced_metrics,
    teacher_forced_sums,
)
from trainer.logger import mel_image
from utils.audio import mel_spectrogram, save_audio, save_mel_png
from utils.schema import Runtime

# STFT settings of the score (auraloss' MelSTFTLoss defaults but 80 mels: with 128 mels at
# 16 kHz and a 1024-point FFT some low mel filters would be empty).
_FFT, _HOP, _N_MELS = 1024, 256, 80


class TtsSamplesEvaluator(Evaluator):
    """Score a TTS model on a held-out dataset: teacher-forced and free-running.

    Args:
        network: the VALL-E network to sample from (its EMA copy when there is one).
        dataset: the dataset phase whose items are spoken: an ``hdf5_codes`` dataset (items
            with codes, phonemes, prompt, speaker, id; ``codec_config`` from its data file).
        num_samples: how many items are generated (in turn from each speaker, the same every
            time).
        teacher_forced_items: how many items (the first N) get the teacher-forced scores
            (0: none).
        reference_items: how many items (the first N) are decoded as references that the
            outputs are compared with by DTW (0: none). Every generated item's own reference is
            always included.
        batch_size: items per teacher-forced batch and per generation batch.
        max_duration_factor: stop generating at this many times the reference length.
        temperature: AR sampling temperature.
        top_k: AR top-k sampling (0: off).
        top_p: AR nucleus sampling (1: off).
        repetition_penalty: AR repetition penalty (1: off).
        nar_temperature: NAR sampling temperature (0: greedy).
        seed: sampling seed, fixed so evaluations differ only by the weights.
        codec_options: overrides of the data file's codec config (e.g. a moved ``checkpoint``).
    """

    def __init__(
        self,
        network: str = "valle",
        dataset: str = "val",
        num_samples: int = 4,
        teacher_forced_items: int = 512,
        reference_items: int = 256,
        batch_size: int = 16,
        max_duration_factor: float = 2.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        nar_temperature: float = 0.0,
        seed: int = 0,
        codec_options: dict[str, Any] | None = None,
        networks: Runtime[dict[str, nn.Module]] = None,
        env: Runtime[TrainerEnv] = None,
        datasets: Runtime[dict[str, Any]] = None,
        logger: Runtime[Any] = None,
    ) -> None:
        super().__init__()
        if network not in networks:
            raise ValueError(
                f"tts_samples: no network {network!r}; the networks are "
                f"{sorted(networks)} (set `network:`)"
            )
        if dataset not in datasets:
            raise ValueError(
                f"tts_samples: no dataset phase {dataset!r}; the datasets are "
                f"{sorted(datasets)} (add datasets.{dataset} or set `dataset:`)"
            )
        if num_samples < 1 or max_duration_factor <= 0 or batch_size < 1:
            raise ValueError(
                f"tts_samples: need num_samples >= 1, batch_size >= 1 and "
                f"max_duration_factor > 0, got {num_samples}, {batch_size} and "
                f"{max_duration_factor}"
            )
        data = datasets[dataset]
        self.codec_config = _codec_config(data, dataset)
        model = networks[network]
        if not callable(getattr(model, "generate", None)):
            raise ValueError(
                f"tts_samples: network {network!r} ({type(model).__name__}) has no generate()"
            )
        if teacher_forced_items and not all(
            callable(getattr(model, f, None)) for f in ("ar_logits", "item_losses")
        ):
            raise ValueError(
                f"tts_samples: network {network!r} ({type(model).__name__}) has "
                f"no ar_logits()/item_losses() for the teacher-forced scores; set "
                f"teacher_forced_items: 0"
            )
        self.network, self.dataset_phase = network, dataset
        self.picked = _round_robin(
            list(getattr(data, "speakers", [""] * len(data))), min(num_samples, len(data))
        )
        self.teacher_forced_items = min(max(teacher_forced_items, 0), len(data))
        ref_items = set(range(min(max(reference_items, 0), len(data))))
        self.references = sorted(ref_items | set(self.picked)) if reference_items else []
        self.batch_size = batch_size
        self.max_duration_factor = max_duration_factor
        self.sampling = dict(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            nar_temperature=nar_temperature,
            seed=seed,
        )
        self.codec_options = dict(codec_options or {})
        self.networks, self.env, self.datasets, self.logger = networks, env, datasets, logger
        self._codec: nn.Module | None = None
        self._loss: nn.Module | None = None
        self._refs: dict[int, torch.Tensor] = {}  # item -> decoded reference waveform
        self._ref_mels: dict[int, torch.Tensor] = {}
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, scalars) per evaluation

    # ------------------------------------------------------------------------- lazy parts

    def codec(self) -> nn.Module:
        if self._codec is None:  # built at the first evaluation, not at start-up
            codec = build_codec_from_config(
                self.codec_config, self.codec_options, where=f"dataset {self.dataset_phase!r}"
            )
            self._codec = codec.to(self.env.device).eval()
        return self._codec

    def mel_stft(self) -> nn.Module:
        if self._loss is None:
            self._loss = mel_stft_loss(int(self.codec().sample_rate))
        return self._loss

    def _reference(self, j: int, n_levels: int) -> torch.Tensor:
        """Item j's codes decoded by the codec (once: references never change)."""
        if j not in self._refs:
            codes = self.datasets[self.dataset_phase][j]["codes"][:n_levels]
            self._refs[j] = decode_codes(self.codec(), [codes])[0]
            self._ref_mels[j] = _plot_mel(self._refs[j], int(self.codec().sample_rate))
        return self._refs[j]

    # ------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        model = self.networks[self.network]
        was_training = model.training
        model.eval()  # the EMA copy is never switched by the trainer: no dropout here
        try:
            results = self._teacher_forced(model)
            results.update(self._free_running(model, step))
        finally:
            model.train(was_training)
        self.history.append((step, dict(results)))
        return results

    def _batches(self, indices: list[int]) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
        data = self.datasets[self.dataset_phase]
        for i in range(0, len(indices), self.batch_size):
            chunk = indices[i : i + self.batch_size]
            yield chunk, [data[j] for j in chunk]

    def _teacher_forced(self, model: nn.Module) -> dict[str, float]:
        if not self.teacher_forced_items:
            return {}
        data = self.datasets[self.dataset_phase]
        sums = dict.fromkeys(TF_SUMS, 0.0)
        for _, items in self._batches(list(range(self.teacher_forced_items))):
            batch = _to_device(data.collate(items), self.env.device)
            for k, v in teacher_forced_sums(model, batch).items():
                sums[k] += v
        return teacher_forced_metrics(sums)

    def _free_running(self, model: nn.Module, step: int) -> dict[str, float]:
        codec = self.codec()
        sr = int(codec.sample_rate)
        n_levels = int(getattr(model, "n_levels", 0)) or None
        folder = self.env.run_dir / "samples" / str(step)
        scores, ratios, mels = [], [], []
        for chunk, items in self._batches(self.picked):
            want = [it["codes"][:n_levels] for it in items]
            limits = [max(1, math.ceil(self.max_duration_factor * c.shape[-1])) for c in want]
            codes = generate_codes(
                model,
                [it["phonemes"] for it in items],
                [it["prompt"][:n_levels] for it in items],
                max_frames=limits,
                device=self.env.device,
                **self.sampling,
            )
            for j, it, wav, gen, ref_codes in zip(
                chunk, items, decode_codes(codec, codes), codes, want
            ):
                ref = self._reference(j, n_levels)
                scores.append(self._score(wav, ref))
                ratios.append(gen.shape[-1] / max(ref_codes.shape[-1], 1))
                mels.append(_plot_mel(wav, sr))
                self._write(folder, _safe_name(it["id"]), wav, ref, sr, step)
        results = {"mel_stft": float(np.mean(scores)), "duration_ratio": float(np.mean(ratios))}
        if self.references:
            speakers = self.datasets[self.dataset_phase].speakers
            for j in self.references:
                self._reference(j, n_levels)
            position = {j: k for k, j in enumerate(self.references)}
            close = closest_reference(
                mels,
                [self._ref_mels[j] for j in self.references],
                [position[j] for j in self.picked],
                [speakers[j] for j in self.references],
            )
            results.update(
                dtw_own=close["own"],
                dtw_others=close["others"],
                own_closest=close["own_closest"],
                own_closest_chance=close["chance"],
            )
        return results

    def _score(self, wav: torch.Tensor, ref: torch.Tensor) -> float:
        n = ref.numel()
        wav = wav[:n] if wav.numel() >= n else torch.nn.functional.pad(wav, (0, n - wav.numel()))
        # The STFT reflect-pads by half an FFT: very short clips are zero-padded first.
        pad = max(0, _FFT - n)
        x = torch.nn.functional.pad(wav, (0, pad)).view(1, 1, -1)
        y = torch.nn.functional.pad(ref, (0, pad)).view(1, 1, -1)
        return float(self.mel_stft()(x, y))

    def _write(
        self, folder, name: str, wav: torch.Tensor, ref: torch.Tensor, sr: int, step: int
    ) -> None:

        for suffix, audio in (("", wav), ("_ref", ref)):
            mel = _plot_mel(audio, sr)
            save_audio(folder / f"{name}{suffix}.wav", audio, sr)
            save_mel_png(folder / f"{name}{suffix}.png", mel, title=f"{name}{suffix} (step {step})")
            if self.logger is not None:
                if audio.numel():
                    self.logger.log_audio(f"samples/{name}{suffix}", audio, sr, step)
                self.logger.log_image(f"samples/{name}{suffix}_mel", mel_image(mel), step)

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The figures of every evaluation so far, so that a resumed run's report still
        compares the first evaluation with the last."""
        return {"history": [[step, dict(scalars)] for step, scalars in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), dict(scalars)) for step, scalars in state["history"]]

    # ------------------------------------------------------------------------- report

    def report(self) -> str:
        """The first and latest evaluation side by side, with what each figure means."""
        if not self.history:
            return "tts_samples: no evaluation ran"
        (s0, first), (s1, last) = self.history[0], self.history[-1]
        lines = [f"{'':34} {'step ' + str(s0):>12} {'step ' + str(s1):>12}"]
        for key, label in _REPORT_ROWS:
            if key in last:
                a = f"{first[key]:.3f}" if key in first else "-"
                lines.append(f"{label:34} {a:>12} {last[key]:>12.3f}")
        folder = self.env.run_dir / "samples" / str(s1)
        lines.append(f"generated and reference wavs of step {s1}: {folder}")
        return "\n".join(lines)


# (scalar, label) rows of :meth:`TtsSamplesEvaluator.report`, in order.
_REPORT_ROWS = (
    ("tf_loss_ar", "held-out loss, AR (teacher-forced)"),
    ("tf_loss_nar", "held-out loss, NAR"),
    ("tf_acc_ar", "AR top-1 accuracy"),
    ("tf_acc_ar_repeat_baseline", "  baseline: repeat previous code"),
    ("tf_acc_ar_changes", "  accuracy where the code changes"),
    ("tf_acc_nar", "NAR top-1 accuracy"),
    ("duration_ratio", "free-running duration / reference"),
    ("dtw_own", "DTW mel distance to own reference"),
    ("dtw_others", "  to other refs of the same voice"),
    ("own_closest", "own reference is the closest"),
    ("own_closest_chance", "  chance level"),
    ("mel_stft", "mel STFT distance (unaligned)"),
)


def _round_robin(speakers: list[str], n: int) -> list[int]:
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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
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


def _plot_mel(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:

    # mel_spectrogram's centred STFT needs more than half an FFT of samples.
    wav = torch.nn.functional.pad(wav, (0, max(0, 1025 - wav.numel())))
    return mel_spectrogram(wav, sample_rate)  # [n_mels, frames]


def _codec_config(data: Any, phase: str) -> dict[str, Any]:
    config = getattr(data, "codec_config", None)
    if config is None and "codec" in getattr(data, "attrs", {}):
        config = json.loads(data.attrs["codec"])
    if not isinstance(config, dict):
        raise ValueError(
            f"tts_samples: dataset {phase!r} ({type(data).__name__}) has no codec "
            f"config; it needs an hdf5_codes dataset (a prepared data.h5)"
        )
    return config


def _safe_name(item_id: Any) -> str:
    return re.sub(r"[^\w.-]", "_", str(item_id)) or "item"
