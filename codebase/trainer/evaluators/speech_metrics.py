"""Checks that a TTS model learned something: the math behind the ``tts_samples`` evaluator.

- :func:`teacher_forced_sums`: VALL-E's held-out AR loss/top-1 accuracy next to the "repeat the
  previous code" baseline on the same frames, and accuracy on the frames where the code changes
  (the ones a copying model gets wrong); NAR loss/accuracy per level.
- :func:`code_prediction_sums`: that accuracy/baseline count for any autoregressive code model
  (VALL-E's AR, Tortoise's GPT).
- :func:`dtw_distance`: mel distance of two utterances after dynamic time warping, so that a
  slower or faster rendering of the same sentence is still close.
- :func:`closest_reference`: is each output closer to its own reference than to the references
  of other sentences in the same voice? A model that ignores the text is right by chance only.
- :func:`voice_profile` and :func:`voice_match`: does an output sound like the voice it should
  have? Its long-term average spectrum and median pitch against each voice's references.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

# Sums over frames, turned into ratios by :func:`teacher_forced_metrics`.
TF_SUMS = (
    "ar_loss",
    "ar_count",
    "ar_frames",
    "ar_hits",
    "repeat_hits",
    "changes",
    "change_hits",
    "nar_loss",
    "nar_hits",
    "nar_count",
)


@torch.no_grad()
def teacher_forced_sums(model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
    """Sums of :data:`TF_SUMS` over a collated batch (``codes`` [B, levels, T] + lengths).

    AR frames are positions 1..T-1 of each item: position i predicts code i of level 0 from the
    codes before it, and the baseline predicts code i-1. Frame 0 has no previous code (the
    prompt comes from another utterance), so it is left out of both. ``ar_loss``/``ar_count``
    are the training loss's terms (every frame plus the stop token). The NAR is scored at every
    level 1..n_levels-1 with the true lower levels as input.
    """
    args = [batch[k] for k in ("phonemes", "phoneme_lengths", "prompt", "prompt_lengths")]
    codes, lengths = batch["codes"], batch["code_lengths"]
    n_levels = int(model.n_levels)
    sums = dict.fromkeys(TF_SUMS, 0.0)
    for level in range(1, n_levels):
        s = model.item_losses(*args, codes, lengths, nar_level=level)
        if level == 1:
            sums["ar_loss"], sums["ar_count"] = (
                float(s["ar_loss"].sum()),
                float(s["ar_count"].sum()),
            )
        sums["nar_loss"] += float(s["nar_loss"].sum())
        sums["nar_hits"] += float(s["nar_correct"].sum())
        sums["nar_count"] += float(s["nar_count"].sum())

    target = codes[:, 0]  # [B, T]
    predicted = model.ar_logits(*args, target, lengths).argmax(-1)[:, : target.shape[1]]
    frame = torch.arange(target.shape[1], device=target.device)[None]
    sums.update(code_prediction_sums(predicted, target, frame < lengths[:, None]))
    return sums


def code_prediction_sums(
    predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> dict[str, float]:
    """How well next-code predictions [B, T] match the codes ``target`` [B, T] on the ``valid``
    [B, T] positions, next to the "repeat the previous code" baseline, for any autoregressive
    code model (VALL-E's AR level, Tortoise's GPT).

    Position 0 has no previous code, so only positions 1.. count. Returns the sums
    ``ar_frames`` (positions scored), ``ar_hits`` (predicted = target), ``repeat_hits``
    (target = the previous target), ``changes`` (positions whose code differs from the
    previous one: what a copying model gets wrong) and ``change_hits``.
    """
    now, before = target[:, 1:], target[:, :-1]
    valid = valid[:, 1:] & valid[:, :-1]
    hits = predicted[:, 1:] == now
    change = valid & (now != before)
    return {
        "ar_frames": float(valid.sum()),
        "ar_hits": float((hits & valid).sum()),
        "repeat_hits": float((valid & (now == before)).sum()),
        "changes": float(change.sum()),
        "change_hits": float((hits & change).sum()),
    }


def teacher_forced_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Ratios of summed :func:`teacher_forced_sums` (names as logged under ``eval/<name>/``)."""

    def ratio(a: str, b: str) -> float:
        return sums[a] / sums[b] if sums[b] else float("nan")

    return {
        "tf_loss_ar": ratio("ar_loss", "ar_count"),
        "tf_loss_nar": ratio("nar_loss", "nar_count"),
        "tf_acc_ar": ratio("ar_hits", "ar_frames"),
        "tf_acc_ar_repeat_baseline": ratio("repeat_hits", "ar_frames"),
        "tf_acc_ar_changes": ratio("change_hits", "changes"),
        "tf_change_fraction": ratio("changes", "ar_frames"),
        "tf_acc_nar": ratio("nar_hits", "nar_count"),
    }


def dtw_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Euclidean frame distance of log-mels a [n_mels, Ta] and b [n_mels, Tb] along the
    best monotonic alignment (dtw-python, symmetric2 steps, normalised by Ta + Tb)."""
    from dtw import dtw
    from scipy.spatial.distance import cdist

    x, y = a.detach().float().cpu().t().numpy(), b.detach().float().cpu().t().numpy()
    if not len(x) or not len(y):
        return float("inf")
    return float(dtw(cdist(x, y), distance_only=True).normalizedDistance)


def closest_reference(
    outputs: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    output_refs: Sequence[int],
    speakers: Sequence[str],
) -> dict[str, Any]:
    """Compare each output mel with every reference mel of the same speaker.

    Args:
        outputs: log-mels [n_mels, T] of generated utterances.
        refs: log-mels of the references (all held-out utterances that may be compared).
        output_refs: for each output, the index of its own reference in ``refs``.
        speakers: the speaker of each reference.

    Returns ``own`` (mean distance to the own reference), ``others`` (mean distance to the
    other references of the same speaker), ``own_closest`` (fraction of outputs whose own
    reference is the nearest), ``chance`` (the expected fraction for a model that ignores the
    text: mean of 1 / candidates) and ``per_item`` rows. Outputs whose speaker has a single
    reference are left out (nothing to compare with).
    """
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for j, s in enumerate(speakers):
        by_speaker[s].append(j)
    own, others, closest, chance, rows = [], [], [], [], []
    for i, (mel, r) in enumerate(zip(outputs, output_refs)):
        candidates = by_speaker[speakers[r]]
        if len(candidates) < 2:
            continue
        dist = {j: dtw_distance(mel, refs[j]) for j in candidates}
        rest = [d for j, d in dist.items() if j != r]
        nearest = min(dist, key=dist.get)
        own.append(dist[r])
        others.append(float(np.mean(rest)))
        closest.append(nearest == r)
        chance.append(1.0 / len(candidates))
        rows.append(
            {
                "output": i,
                "own": dist[r],
                "others": others[-1],
                "closest": nearest == r,
                "rank": 1 + sum(d < dist[r] for d in rest),
                "candidates": len(candidates),
            }
        )
    if not rows:
        nan = float("nan")
        return {"own": nan, "others": nan, "own_closest": nan, "chance": nan, "per_item": []}
    return {
        "own": float(np.mean(own)),
        "others": float(np.mean(others)),
        "own_closest": float(np.mean(closest)),
        "chance": float(np.mean(chance)),
        "per_item": rows,
    }


# Frames quieter than this many log units (natural log of mel power) below an utterance's
# loudest frame are silence and left out of its voice profile (~40 dB).
_SILENCE_LOG = 9.2


@dataclass
class VoiceProfile:
    """What :func:`voice_match` compares: ``spectrum`` [n_mels], the long-term average log-mel
    spectrum of the voiced part minus its mean (so loudness does not count), and ``pitch``, the
    median fundamental frequency in Hz (NaN when none was found)."""

    spectrum: np.ndarray
    pitch: float


def voice_profile(wav: torch.Tensor, mel: torch.Tensor, sample_rate: int) -> VoiceProfile:
    """The :class:`VoiceProfile` of one utterance from its audio [T] and log-mel [n_mels, F].

    Pitch is torchaudio's ``detect_pitch_frequency`` (normalised cross-correlation, 60-500 Hz)
    over the whole clip, median over frames. Audio decoded from a codec that keeps only mel
    bands (``mel_rvq``) loses the harmonics of low voices: their pitch then reads an octave or
    more too high, so compare outputs with references decoded the same way, never with the
    original recordings.
    """
    import torchaudio.functional as AF

    mel = mel.detach().float().cpu()
    if mel.numel() == 0 or wav.numel() < sample_rate // 20:
        return VoiceProfile(np.full(mel.shape[0], np.nan), float("nan"))
    energy = mel.exp().sum(0).clamp_min(1e-10).log()
    loud = mel[:, energy >= energy.max() - _SILENCE_LOG]
    spectrum = loud.mean(1).numpy()
    f0 = AF.detect_pitch_frequency(
        wav.detach().float().cpu()[None], sample_rate, freq_low=60, freq_high=500
    )[0]
    return VoiceProfile(spectrum - spectrum.mean(), float(f0.median()))


def voice_match(
    outputs: Sequence[VoiceProfile],
    targets: Sequence[str],
    references: dict[str, Sequence[VoiceProfile]],
) -> dict[str, float]:
    """How close each output is to the voice it should have (``targets``: a key of
    ``references``), against the other voices.

    A voice is the mean spectrum and the median pitch of its references. The distance of an
    output to a voice is the RMS difference of their spectra (log-mel units). Returns
    ``voice_dist_own`` (mean distance to the own voice), ``voice_dist_other`` (to the nearest
    other voice), ``voice_closest`` (fraction of outputs nearest to their own voice) and
    ``voice_closest_chance`` (1 / voices), ``pitch_out`` (mean pitch of the outputs, Hz),
    ``pitch_own`` (the own voices' pitch, averaged over the outputs), ``pitch_error``
    (mean |output - own voice| in semitones) and ``pitch_error_other`` (to the nearest other
    voice's pitch, in semitones). Outputs with no pitch found are left out of the pitch
    figures; with fewer than two voices the "other" figures are NaN.
    """
    nan = float("nan")
    missing = sorted(set(targets) - set(references))
    if missing:
        raise ValueError(f"voice_match: no references of voice(s) {missing}")
    spectrum = {v: np.mean([p.spectrum for p in refs], 0) for v, refs in references.items()}
    pitch = {v: float(np.nanmedian([p.pitch for p in refs])) for v, refs in references.items()}
    own, other, closest, err, err_other, f0_out, f0_own = [], [], [], [], [], [], []
    for out, target in zip(outputs, targets):
        if np.isnan(out.spectrum).any():
            continue
        dist = {v: float(np.sqrt(np.mean((out.spectrum - c) ** 2))) for v, c in spectrum.items()}
        own.append(dist[target])
        rest = [d for v, d in dist.items() if v != target]
        other.append(min(rest) if rest else nan)
        closest.append(min(dist, key=dist.get) == target)
        if out.pitch > 0 and pitch[target] > 0:
            semitones = {v: abs(12 * np.log2(out.pitch / f)) for v, f in pitch.items() if f > 0}
            f0_out.append(out.pitch)
            f0_own.append(pitch[target])
            err.append(semitones[target])
            others = [d for v, d in semitones.items() if v != target]
            err_other.append(min(others) if others else nan)

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else nan

    return {
        "voice_dist_own": mean(own),
        "voice_dist_other": mean(other),
        "voice_closest": mean(closest),
        "voice_closest_chance": 1.0 / len(references) if references else nan,
        "pitch_out": mean(f0_out),
        "pitch_own": mean(f0_own),
        "pitch_error": mean(err),
        "pitch_error_other": mean(err_other),
    }
