"""The learning checks of the tts_samples evaluator: teacher-forced scores and DTW distances."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.evaluators.speech_metrics import (
    TF_SUMS,
    closest_reference,
    dtw_distance,
    teacher_forced_metrics,
    teacher_forced_sums,
    voice_match,
    voice_profile,
)
from trainer.evaluators.speech_samples import plot_mel, round_robin


class OracleLM(torch.nn.Module):
    """A stand-in for VALL-E's teacher-forced API that predicts level 0 by a fixed rule."""

    n_levels = 2

    def __init__(self, rule: str, codebook_size: int = 8) -> None:
        super().__init__()
        self.rule, self.k = rule, codebook_size

    def ar_logits(self, phonemes, phoneme_lengths, prompt, prompt_lengths, codes0, lengths):
        b, t = codes0.shape
        if self.rule == "truth":  # position i predicts frame i
            guess = F.pad(codes0, (0, 1), value=self.k)
        else:  # "repeat": position i predicts frame i - 1 (position 0: code 0)
            guess = F.pad(codes0, (1, 0))
        return F.one_hot(guess, self.k + 1).float()  # [B, T + 1, K + 1]

    def item_losses(
        self, phonemes, phoneme_lengths, prompt, prompt_lengths, codes, lengths, nar_level=None
    ):
        ones = lengths.float()
        return {
            "ar_loss": ones * 2,
            "ar_count": ones + 1,
            "nar_loss": ones,
            "nar_correct": ones / 2,
            "nar_count": ones,
        }


def batch():
    codes = torch.tensor(
        [[[1, 1, 2, 2, 2, 3], [0] * 6], [[4, 5, 5, 6, 0, 0], [0] * 6]]
    )  # item 1 has 4 frames (then padding)
    return {
        "phonemes": torch.ones(2, 3, dtype=torch.long),
        "phoneme_lengths": torch.tensor([3, 3]),
        "prompt": torch.zeros(2, 2, 1, dtype=torch.long),
        "prompt_lengths": torch.tensor([1, 1]),
        "codes": codes,
        "code_lengths": torch.tensor([6, 4]),
    }


def test_teacher_forced_counts_frames_baseline_and_changes():
    sums = teacher_forced_sums(OracleLM("truth"), batch())
    assert set(sums) == set(TF_SUMS)
    # frames 1..T-1: item 0 has 5 (1,2,2,2,3 after 1), item 1 has 3 (padding excluded)
    assert sums["ar_frames"] == 8
    # repeats: item 0 frames 1,3,4 (1->1, 2->2, 2->2); item 1 frame 2 (5->5)
    assert sums["repeat_hits"] == 4 and sums["changes"] == 4
    m = teacher_forced_metrics(sums)
    assert m["tf_acc_ar"] == 1 and m["tf_acc_ar_changes"] == 1
    assert m["tf_acc_ar_repeat_baseline"] == 0.5 and m["tf_change_fraction"] == 0.5
    assert m["tf_loss_ar"] == pytest.approx(2 * 10 / 12)  # the model's own loss terms
    assert m["tf_acc_nar"] == 0.5

    copy = teacher_forced_metrics(teacher_forced_sums(OracleLM("repeat"), batch()))
    assert copy["tf_acc_ar"] == copy["tf_acc_ar_repeat_baseline"] == 0.5
    assert copy["tf_acc_ar_changes"] == 0  # a copying model never gets a change right


def test_teacher_forced_metrics_empty_is_nan():
    m = teacher_forced_metrics(dict.fromkeys(TF_SUMS, 0.0))
    assert all(math.isnan(v) for v in m.values())


def test_dtw_is_zero_for_a_time_stretched_copy_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 30, generator=g)
    slow = a.repeat_interleave(2, dim=1)  # the same "utterance" at half speed
    assert dtw_distance(a, slow) == pytest.approx(0.0, abs=1e-9)
    assert dtw_distance(a, torch.randn(20, 30, generator=g)) > 1.0
    assert dtw_distance(a, a[:, :0]) == math.inf


def test_closest_reference_finds_own_references_and_reports_chance():
    g = torch.Generator().manual_seed(1)
    refs = [torch.randn(10, 25 + 3 * j, generator=g) for j in range(6)]
    speakers = ["a", "a", "a", "b", "b", "c"]  # c has a single reference: not comparable
    outputs = [refs[j] + 0.05 * torch.randn(refs[j].shape, generator=g) for j in (0, 2, 3, 5)]
    out = closest_reference(outputs, refs, [0, 2, 3, 5], speakers)
    rows = out["per_item"]
    assert [r["output"] for r in rows] == [0, 1, 2]  # output 3 (speaker c) is left out
    assert out["own_closest"] == 1.0 and out["own"] < out["others"]
    assert [r["rank"] for r in rows] == [1, 1, 1]
    assert out["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    # Outputs that ignore the text (another sentence of the voice) are never closest.
    wrong = closest_reference([refs[1], refs[1], refs[4]], refs, [0, 2, 3], speakers)
    assert wrong["own_closest"] == 0.0
    assert all(r["rank"] >= 2 and not r["closest"] for r in wrong["per_item"])


def test_round_robin_takes_speakers_in_turn():
    assert round_robin(["a", "a", "a", "b", "c", "c"], 5) == [0, 3, 4, 1, 5]
    assert round_robin(["a", "a"], 2) == [0, 1]


SR = 16000


def voiced(f0: float, tilt: float, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A synthetic voice: harmonics of ``f0`` whose amplitude falls by ``tilt`` per harmonic,
    a little vibrato, 0.2 s of silence on each side (left out of the profile)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * seconds)) / SR
    phase = 2 * math.pi * torch.cumsum(f0 * (1 + 0.01 * torch.sin(2 * math.pi * 5 * t)), 0) / SR
    wav = sum(tilt**k * torch.sin(k * phase) for k in range(1, 30))
    wav = 0.1 * wav / wav.abs().max() + 1e-3 * torch.randn(t.shape, generator=g)
    return F.pad(wav, (SR // 5, SR // 5))


def profile(wav: torch.Tensor):
    return voice_profile(wav, plot_mel(wav, SR), SR)


def test_voice_profile_reads_pitch_and_ignores_loudness_and_silence():
    low, high = profile(voiced(110, 0.8)), profile(voiced(220, 0.8))
    assert low.pitch == pytest.approx(110, rel=0.05) and high.pitch == pytest.approx(220, rel=0.05)
    loud = profile(4 * voiced(110, 0.8))  # the spectrum is level-free: 12 dB louder is the same
    assert abs(loud.spectrum - low.spectrum).mean() < 0.05  # (the log floor moves a little)
    long = profile(F.pad(voiced(110, 0.8), (SR, SR)))  # more silence: same voiced part
    assert abs(long.spectrum - low.spectrum).mean() < 0.05
    empty = profile(torch.zeros(100))
    assert math.isnan(empty.pitch) and torch.tensor(empty.spectrum).isnan().all()


def test_voice_match_finds_the_voice_an_output_has():
    refs = {
        "low_dark": [profile(voiced(110, 0.6, seed=s)) for s in range(3)],
        "high_bright": [profile(voiced(220, 0.9, seed=s)) for s in range(3)],
        "mid": [profile(voiced(150, 0.75, seed=s)) for s in range(3)],
    }
    outputs = [profile(voiced(112, 0.6, seed=9)), profile(voiced(215, 0.9, seed=9))]
    right = voice_match(outputs, ["low_dark", "high_bright"], refs)
    assert right["voice_closest"] == 1.0 and right["voice_closest_chance"] == pytest.approx(1 / 3)
    assert right["voice_dist_own"] < right["voice_dist_other"]
    assert right["pitch_error"] < 0.5 < right["pitch_error_other"]  # semitones
    assert right["pitch_out"] == pytest.approx((112 + 215) / 2, rel=0.05)
    assert right["pitch_own"] == pytest.approx(165, rel=0.05)
    # The same outputs said to be the other voices: never the closest, far in pitch.
    wrong = voice_match(outputs, ["high_bright", "low_dark"], refs)
    assert wrong["voice_closest"] == 0.0 and wrong["voice_dist_own"] > wrong["voice_dist_other"]
    assert wrong["pitch_error"] > 11  # an octave
    with pytest.raises(ValueError, match="no references of voice"):
        voice_match(outputs, ["low_dark", "nobody"], refs)
