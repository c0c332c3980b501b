"""espeak-ng synthesis (ctypes) and the offline demo corpus built with it."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from data.audio import demo_corpus
from data.audio.demo_corpus import (
    HAND_WRITTEN,
    MAX_WORDS,
    MIN_WORDS,
    NEW_SPEAKER,
    NEW_VOICE,
    VOICES,
    DemoOptionError,
    build_demo_corpus,
    build_new_voice_corpus,
    make_sentences,
    plan,
    plan_new_voice,
)
from data.audio.espeak_synth import EspeakSynth, UnknownVoice, trim_silence
from data.audio.fetchers import fetch

SR = 16000
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture(scope="module")
def synth() -> EspeakSynth:
    return EspeakSynth(SR)


def _seconds(wav: torch.Tensor) -> float:
    return wav.numel() / SR


def _mean_f0(wav: torch.Tensor, lo: float = 60.0, hi: float = 400.0) -> float:
    """Median pitch over loud 40 ms frames, from the autocorrelation peak (a pitch proxy)."""
    frame, hop = int(0.04 * SR), int(0.01 * SR)
    frames = wav.unfold(0, frame, hop)
    frames = frames[frames.pow(2).mean(1) > 0.1 * frames.pow(2).mean(1).max()]
    frames = frames - frames.mean(1, keepdim=True)
    spec = torch.fft.rfft(frames, n=2 * frame)
    ac = torch.fft.irfft(spec.abs() ** 2)[:, :frame]
    lags = torch.arange(int(SR / hi), int(SR / lo))
    best = lags[ac[:, lags].argmax(1)]
    return float(SR / best.float().median())


def test_synthesize_speech_like(synth):
    wav = synth.synthesize(TEXT)
    assert synth.sample_rate_native == 22050
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert 2.0 < _seconds(wav) < 8.0  # 13 words at 175 wpm is about 4.5 s
    assert wav.abs().max() > 0.2 and wav.pow(2).mean().sqrt() > 0.02
    # trimmed: at most 0.1 s (plus a sample) of silence at each end
    loud = torch.nonzero(wav.abs() >= 1e-3).flatten()
    assert loud[0] <= 0.1 * SR + 1 and wav.numel() - 1 - loud[-1] <= 0.1 * SR + 1


def test_duration_follows_text_and_rate(synth):
    short = synth.synthesize("Hello there.")
    long = synth.synthesize(TEXT)
    fast = synth.synthesize(TEXT, rate=320)
    assert _seconds(long) > 2 * _seconds(short)
    assert _seconds(fast) < 0.75 * _seconds(long)


def test_voices_differ_in_pitch_and_are_deterministic(synth):
    low = synth.synthesize(TEXT, variant="m3", pitch=20, pitch_range=30)
    high = synth.synthesize(TEXT, variant="f2", pitch=85, pitch_range=60)
    assert _mean_f0(high) > 1.4 * _mean_f0(low)
    again = synth.synthesize(TEXT, variant="m3", pitch=20, pitch_range=30)
    assert torch.equal(low, again)  # settings are reapplied: no leak from the f2 call


def test_breathy_voice_same_samples_later(synth):
    # f2's breath noise was seeded from the clock by espeak_Initialize: a second later the
    # samples differed until the seeds were fixed.
    first = synth.synthesize("Her busy wagon danced.", variant="f2")
    synth.synthesize("Something else in between.", variant="m3")
    time.sleep(1.05)
    assert torch.equal(first, synth.synthesize("Her busy wagon danced.", variant="f2"))


def test_unknown_variant_fails(synth):
    with pytest.raises(ValueError, match="did you mean 'klatt'"):
        synth.synthesize("Hello.", variant="klat")
    with pytest.raises(UnknownVoice, match="no voice 'no-such-voice'"):
        synth.synthesize("Hello.", voice="no-such-voice")
    assert synth.synthesize("Hello.").numel() > 0  # still usable afterwards


def test_trim_silence_keeps_a_tenth_of_a_second():
    wav = torch.cat([torch.zeros(SR), torch.full((100,), 0.5), torch.zeros(SR)])
    out = trim_silence(wav, SR)
    assert out.numel() == 100 + 2 * SR // 10
    assert trim_silence(torch.zeros(50), SR).numel() == 0


def test_phonemizer_still_works_after_synthesis(synth):
    from data.audio.phonemes import Phonemizer

    synth.synthesize("Hello.")
    assert Phonemizer().phonemize_symbols(["hello"]) == [["h", "ə", "l", "oʊ"]]
    assert synth.synthesize("Hello.").numel() > 0


def test_sentences_distinct_and_sized():
    texts = make_sentences(2000, random.Random(3))
    assert len({t.lower() for t in texts}) == 2000
    assert all(MIN_WORDS <= len(t.split()) <= MAX_WORDS for t in texts)
    assert set(HAND_WRITTEN) <= set(texts)
    assert make_sentences(50, random.Random(3)) == make_sentences(50, random.Random(3))
    assert make_sentences(50, random.Random(3)) != make_sentences(50, random.Random(4))


def test_plan_rejects_too_few_utterances():
    with pytest.raises(ValueError, match="training utterance per speaker"):
        plan(16, 3, 0)


# Building a corpus takes seconds of espeak synthesis: the tests that build one are marked slow.
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(
        tmp_path_factory.mktemp("demo") / "corpus",
        utterances=30,
        speakers=3,
        seed=0,
        workers=1,
        progress=False,
    )


def _rows(tsv: Path) -> list[list[str]]:
    return [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]


@pytest.mark.slow
def test_corpus_layout_and_fetch(corpus):
    train, skipped = fetch("tsv", corpus.train_tsv)
    held, skipped_held = fetch("tsv", corpus.heldout_tsv)
    assert skipped == [] and skipped_held == []
    assert len(train) + len(held) == 30
    assert (len(train), len(held)) == (corpus.train_utterances, corpus.heldout_utterances)
    assert len({u.text for u in held}) >= 10  # at least ten held-out sentences
    assert {u.speaker for u in train} == {"spk0", "spk1", "spk2"}
    assert not {u.text for u in held} & {u.text for u in train}
    for u in train + held:
        assert MIN_WORDS <= len(u.text.split()) <= MAX_WORDS
        info = sf.info(str(u.path))
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert u.path.parent.name == u.speaker
    total = sum(sf.info(str(u.path)).duration for u in train + held)
    assert total == pytest.approx(corpus.seconds, abs=0.05)
    speakers = json.loads(corpus.speakers_json.read_text())
    assert list(speakers) == ["spk0", "spk1", "spk2"]
    assert len({(s["variant"], s["pitch"]) for s in speakers.values()}) == 3


@pytest.mark.slow
def test_corpus_deterministic(corpus, tmp_path):
    other = build_demo_corpus(
        tmp_path / "again", utterances=30, speakers=3, seed=0, workers=1, progress=False
    )
    for name in ("train.tsv", "heldout.tsv", "speakers.json"):
        assert (other.root / name).read_bytes() == (corpus.root / name).read_bytes()
    rows = _rows(corpus.train_tsv)[:2] + _rows(corpus.heldout_tsv)[:1]
    for rel, _, _ in rows:
        assert (other.root / rel).read_bytes() == (corpus.root / rel).read_bytes()
    different = build_demo_corpus(
        tmp_path / "seed1", utterances=30, speakers=3, seed=1, workers=1, progress=False
    )
    assert different.train_tsv.read_bytes() != corpus.train_tsv.read_bytes()


@pytest.mark.slow
def test_existing_corpus_not_rebuilt(corpus, monkeypatch):
    tsv = corpus.train_tsv
    wav = corpus.root / _rows(tsv)[0][0]
    before = (tsv.stat().st_mtime_ns, wav.stat().st_mtime_ns)

    def no_synthesis(job):
        raise AssertionError("rebuilt an existing corpus")

    monkeypatch.setattr(demo_corpus, "_synth_job", no_synthesis)
    again = build_demo_corpus(
        corpus.root, utterances=30, speakers=3, seed=0, workers=1, progress=False
    )
    assert again == corpus
    assert (tsv.stat().st_mtime_ns, wav.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_changed_arguments_rebuild(tmp_path):
    first = build_demo_corpus(
        tmp_path, utterances=24, speakers=2, seed=0, workers=1, progress=False
    )
    second = build_demo_corpus(
        tmp_path, utterances=26, speakers=2, seed=0, workers=1, progress=False
    )
    assert first.train_utterances + 2 == second.train_utterances
    assert json.loads((tmp_path / "corpus.json").read_text())["utterances"] == 26


@pytest.mark.slow
def test_demo_fetcher_builds_missing_corpus(tmp_path, monkeypatch):
    from data.audio import demo_corpus, fetchers
    from data.audio.fetchers import fetch

    calls = []
    real = demo_corpus.build_demo_corpus

    def small_build(out, **kwargs):
        calls.append(out)
        return real(out, utterances=30, speakers=3, workers=1, progress=False)

    monkeypatch.setattr(fetchers, "build_demo_corpus", small_build)
    items, skipped = fetch("demo", tmp_path / "corpus" / "train.tsv")
    assert calls == [tmp_path / "corpus"] and items and not skipped
    held, _ = fetch("demo", tmp_path / "corpus" / "heldout.tsv")
    assert calls == [tmp_path / "corpus"]  # built once
    assert not {u.text for u in held} & {u.text for u in items}
    with pytest.raises(ValueError, match="train.tsv or heldout.tsv"):
        fetch("demo", tmp_path / "elsewhere")


def test_new_voice_is_none_of_the_corpus_voices_and_keeps_the_base_held_out_set():
    assert (NEW_VOICE["variant"], NEW_VOICE["pitch"]) not in {(v, p) for v, p, _, _ in VOICES}
    base_train, base_held = plan(200, 3, 0)
    train, held = plan_new_voice(50, 6, base_utterances=200, base_speakers=3)
    assert len(train) == 50 and len(held) == 6
    assert {s for *_, s in train + held} == {NEW_SPEAKER}
    held_texts = {t for _, t, _ in held}
    # held-out: sentences the base never trained on, distinct; training: the base's training ones
    assert held_texts <= {t for _, t, _ in base_held} and len(held_texts) == 6
    assert not held_texts & {t for _, t, _ in base_train}
    assert [t for _, t, _ in train] == [t for _, t, _ in base_train[:50]]
    assert len({p for p, _, _ in train + held}) == 56
    with pytest.raises(DemoOptionError, match="heldout_sentences"):
        plan_new_voice(50, 1000, base_utterances=200, base_speakers=3)
    with pytest.raises(DemoOptionError, match="train_utterances"):
        plan_new_voice(0, 4, base_utterances=200, base_speakers=3)


@pytest.mark.slow
def test_new_voice_fetcher_builds_the_missing_corpus_in_the_new_voice(tmp_path, monkeypatch):
    from data.audio import fetchers

    calls = []

    def small_build(out, **kwargs):
        calls.append(out)
        return build_new_voice_corpus(
            out, 12, 3, workers=1, progress=False, base_utterances=100, base_speakers=2
        )

    monkeypatch.setattr(fetchers, "build_new_voice_corpus", small_build)
    items, skipped = fetch("demo_new_voice", tmp_path / "nv" / "train.tsv")
    held, _ = fetch("demo_new_voice", tmp_path / "nv" / "heldout.tsv")
    assert calls == [tmp_path / "nv"] and len(items) == 12 and len(held) == 3 and not skipped
    assert {u.speaker for u in items + held} == {NEW_SPEAKER}
    assert json.loads((tmp_path / "nv" / "speakers.json").read_text()) == {NEW_SPEAKER: NEW_VOICE}
    # built once for the same arguments
    wav, sr = sf.read(str(items[0].path))
    assert sr == SR and len(wav) > SR // 2
    again = build_new_voice_corpus(
        tmp_path / "nv", 12, 3, workers=1, progress=False, base_utterances=100, base_speakers=2
    )
    assert again.train_utterances == 12 and calls == [tmp_path / "nv"]
    with pytest.raises(ValueError, match="new-voice corpus's train.tsv"):
        fetch("demo_new_voice", tmp_path / "elsewhere")
