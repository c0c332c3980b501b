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
"""

from __future__ import annotations

from collections import defaultdict
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
