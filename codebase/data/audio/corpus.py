"""Corpus screening shared by ``paired_voice_audio`` and ``data.h5`` preparation: which
items are usable (from headers alone), why the others are skipped, and a stable split."""

from __future__ import annotations

import hashlib

from tqdm import tqdm

from data.audio.fetchers import Skipped, Utterance
from utils.audio import AudioError, audio_info


def screen(
    items: list[Utterance],
    sample_rate: int,
    max_wav_length: int | None = None,
    max_text_length: int | None = None,
) -> tuple[list[Utterance], list[float], Skipped]:
    """Keep the items whose text and audio header are usable: ``(kept, seconds, skipped)``.

    Reads only headers (soundfile.info), so it is fast on large corpora; audio that is corrupt
    past its header is caught later, when it is loaded.
    """
    kept, durations, skipped = [], [], []
    for item in tqdm(items, desc="screening audio", disable=len(items) < 5000, leave=False):
        text = item.text.strip()
        if not text:
            skipped.append((item.id, "empty text"))
            continue
        if max_text_length is not None and len(text) > max_text_length:
            skipped.append(
                (
                    item.id,
                    f"too long (text): {len(text)} > max_text_length {max_text_length} characters",
                )
            )
            continue
        try:
            frames, rate, _ = audio_info(item.path)
        except AudioError as e:
            detail = f" ({e.detail})" if e.reason == "unreadable" else ""
            skipped.append((item.id, f"{e.reason}: {item.path}{detail}"))
            continue
        if frames <= 0 or rate <= 0:
            skipped.append((item.id, f"empty audio: {item.path}"))
            continue
        resampled = frames * sample_rate / rate  # length once resampled to sample_rate
        if max_wav_length is not None and resampled > max_wav_length:
            skipped.append(
                (
                    item.id,
                    f"too long (audio): {resampled:.0f} > max_wav_length {max_wav_length} samples",
                )
            )
            continue
        kept.append(
            item if text == item.text else Utterance(item.path, text, item.speaker, item.id)
        )
        durations.append(frames / rate)
    return kept, durations, skipped


def split_fraction(uid: str) -> float:
    """A stable number in [0, 1) for an item id (same on every machine and Python run)."""
    return int(hashlib.sha1(uid.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def reason_category(reason: str) -> str:
    """``"too long (audio): 9000 > ..."`` -> ``"too long (audio)"`` (the key skips count by)."""
    return reason.split(":", 1)[0]
