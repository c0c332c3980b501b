"""Corpus screening shared by ``paired_voice_audio`` and ``data.h5`` preparation: which
items are usable (from headers alone), why the others are skipped, and a stable split.

Both datasets call :func:`screen`, so an item is kept or skipped, and counted under the same
reason, whichever way the corpus is read.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from tqdm import tqdm

from data.audio.fetchers import Skipped, Utterance
from utils.audio import AudioError, audio_info


def screen(
    items: list[Utterance],
    sample_rate: int,
    max_wav_length: int | None = None,
    max_text_length: int | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
    text_check: Callable[[str], str | None] | None = None,
) -> tuple[list[Utterance], list[float], Skipped]:
    """Keep the items whose id, text and audio header are usable: ``(kept, seconds, skipped)``.

    ``text_check(text)`` adds the reader's own reason to skip a transcript, or None (the BPE
    tokenizer: characters it lacks, too many tokens); it runs after :func:`text_problem`.

    A repeated id keeps its first item (the id names the audio file in ``lj`` and ``tsv``
    corpora, so a later line would pair that audio with another transcript). Reads only
    headers (soundfile.info), so it is fast on large corpora; audio that is corrupt past its
    header is caught later, when it is loaded.
    """
    kept, durations = [], []
    items, skipped = unique(items)
    for item in tqdm(items, desc="screening audio", disable=len(items) < 5000, leave=False):
        text = item.text.strip()
        reason = text_problem(text, max_text_length)
        if reason is None and text_check is not None:
            reason = text_check(text)
        if reason is None:
            reason, seconds = _audio_problem(item, sample_rate, max_wav_length)
        if reason is None:
            reason = duration_problem(seconds, min_duration, max_duration)
        if reason is not None:
            skipped.append((item.id, reason))
            continue
        kept.append(
            item
            if text == item.text
            else Utterance(item.path, text, item.speaker, item.id, item.source)
        )
        durations.append(seconds)
    return kept, durations, skipped


def unique(items: list[Utterance]) -> tuple[list[Utterance], Skipped]:
    """The first item of each id; the later ones as ``(id, "duplicate id: ...")`` skips."""
    first: dict[str, Utterance] = {}
    out, skipped = [], []
    for u in items:
        if u.id in first:
            where = f"{u.source} repeats" if u.source else "repeats"
            earlier = first[u.id].source or str(first[u.id].path)
            skipped.append((u.id, f"duplicate id: {where} the id of {earlier} (the first is kept)"))
        else:
            first[u.id] = u
            out.append(u)
    return out, skipped


def text_problem(text: str, max_text_length: int | None = None) -> str | None:
    """Why a (stripped) transcript cannot be trained on, or None: empty, no word in it
    (only punctuation, such as ``"..."``), or longer than ``max_text_length``."""
    if not text:
        return "empty text"
    if not any(ch.isalnum() for ch in text):
        return f"nothing to say: transcript {text!r} has no letters or digits"
    if max_text_length is not None and len(text) > max_text_length:
        return f"too long (text): {len(text)} > max_text_length {max_text_length} characters"
    return None


def duration_problem(
    seconds: float, min_duration: float | None, max_duration: float | None
) -> str | None:
    """Why a clip of ``seconds`` is outside ``[min_duration, max_duration]``, or None."""
    if min_duration is not None and seconds < min_duration:
        return f"too short: {seconds:.3f} s < min_duration {min_duration} s"
    if max_duration is not None and seconds > max_duration:
        return f"too long (audio): {seconds:.1f} s > max_duration {max_duration} s"
    return None


def _audio_problem(
    item: Utterance, sample_rate: int, max_wav_length: int | None
) -> tuple[str | None, float]:
    """``(reason or None, seconds)`` from the audio file's header."""
    try:
        frames, rate, _ = audio_info(item.path)
    except AudioError as e:
        detail = f" ({e.detail})" if e.reason == "unreadable" else ""
        return f"{e.reason}: {item.path}{detail}", 0.0
    if frames <= 0 or rate <= 0:
        return f"empty audio: {item.path}", 0.0
    resampled = frames * sample_rate / rate  # length once resampled to sample_rate
    if max_wav_length is not None and resampled > max_wav_length:
        return (
            f"too long (audio): {resampled:.0f} > max_wav_length {max_wav_length} samples",
            frames / rate,
        )
    return None, frames / rate


def split_fraction(uid: str) -> float:
    """A stable number in [0, 1) for an item id (same on every machine and Python run)."""
    return int(hashlib.sha1(uid.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def reason_category(reason: str) -> str:
    """``"too long (audio): 9000 > ..."`` -> ``"too long (audio)"`` (the key skips count by)."""
    return reason.split(":", 1)[0]
