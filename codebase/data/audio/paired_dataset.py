"""``paired_voice_audio``: raw (audio, text, speaker) items read straight from corpus files.

Items are screened when the dataset is built, cheaply (file header only), by the same rules as
``data.h5`` preparation (:func:`data.audio.corpus.screen`): bad index lines, repeated ids,
missing or unreadable audio, too short or too long clips and transcripts with no word in them
are skipped and counted with a reason, never fatal. Run it as a self-check:

    python -m data.audio.paired_dataset -opt ../experiments/x.yml [--phase val] [--samples 4]

prints item/hour/speaker counts, a duration histogram and every skipped item, and writes a few
items as ``<id>.wav`` + ``<id>.png`` (mel) to listen to and look at.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m` runs this file as __main__; run the CLI from the module under its package
    # name instead, so the dataset class is defined and registered once, not twice.
    import sys

    from data.audio.paired_dataset import main
    from utils.errors import run_command

    sys.exit(run_command(main))

import logging
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data import register_dataset
from data.audio.corpus import reason_category, screen, split_fraction
from data.audio.fetchers import fetch
from data.loader import pad_batch
from data.spec import build_dataset, require_phase, validate_datasets
from utils.audio import (
    AudioError,
    load_audio,
    mel_spectrogram,
    save_audio,
    save_mel_png,
)
from utils.options import experiment_parser, load_cli
from utils.schema import ConfigError, Runtime
from utils.seed import generator

log = logging.getLogger(__name__)


@register_dataset("paired_voice_audio")
class PairedVoiceAudioDataset(Dataset):
    """Audio + transcript + speaker from LJSpeech, LibriTTS or TSV corpora (DLAS options).

    Args:
        path: corpus folder or index file, or a list of them (relative: to the YAML's folder).
        fetcher_mode: how to read each path: ``lj``, ``libritts``, ``tsv`` (or a list).
        sample_rate: every clip is resampled to this rate.
        max_wav_length: longest clip kept, in samples at ``sample_rate`` (None: no limit).
        min_duration: shortest clip kept, in seconds (None: no limit); a blip of a few
            milliseconds is no utterance (``prepare`` has its own, 0.3 s by default).
        max_text_length: longest transcript kept, in characters (None: no limit).
        load_conditioning: also return ``conditioning`` clips from the same speaker.
        num_conditioning_candidates: clips per item (N).
        conditioning_length: samples per clip (cropped or zero-padded).
        phase: ``train`` or ``val``; with ``val_fraction`` it picks the side of the split.
        val_fraction: share of items (by hashed id, independent of ``seed``) held out for val.
        seed: seeds the conditioning choice and crops (with the item index).
    """

    def __init__(
        self,
        path: Path | list[Path],
        fetcher_mode: str | list[str] = "lj",
        sample_rate: int = 22050,
        max_wav_length: int | None = None,
        max_text_length: int | None = None,
        min_duration: float | None = 0.1,
        load_conditioning: bool = False,
        num_conditioning_candidates: int = 1,
        conditioning_length: int = 44000,
        phase: Runtime[str] = "train",
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"paired_voice_audio: val_fraction must be in [0, 1), got {val_fraction}"
            )
        if val_fraction > 0 and phase not in ("train", "val"):
            raise ValueError(
                f"paired_voice_audio: phase must be 'train' or 'val' when "
                f"val_fraction is set, got {phase!r}"
            )
        if num_conditioning_candidates < 1 or conditioning_length < 1:
            raise ValueError(
                "paired_voice_audio: num_conditioning_candidates and "
                "conditioning_length must be >= 1"
            )
        self.sample_rate, self.max_wav_length = sample_rate, max_wav_length
        self.load_conditioning = load_conditioning
        self.num_conditioning = num_conditioning_candidates
        self.conditioning_length = conditioning_length
        self.phase, self.seed = phase, seed

        fetched, self.skipped = fetch(fetcher_mode, path)
        if val_fraction > 0:  # split before screening: only this phase's audio is opened
            want_val = phase == "val"
            fetched = [u for u in fetched if (split_fraction(u.id) < val_fraction) == want_val]
        self.items, self._durations, bad = screen(
            fetched, sample_rate, max_wav_length, max_text_length, min_duration=min_duration
        )
        self.skipped += bad
        self._bad: set[int] = set()  # indices whose audio failed to decode in __getitem__
        self._by_speaker: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            self._by_speaker[item.speaker].append(i)
        counts = ", ".join(f"{k} {v}" for k, v in self.skip_counts().items())
        log.log(
            logging.WARNING if self.skipped else logging.INFO,
            "paired_voice_audio (%s): %d items, %d skipped%s",
            phase,
            len(self.items),
            len(self.skipped),
            f" ({counts})" if counts else "",
        )

    # ------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load_item(index)[1]

    def load_item(self, index: int) -> tuple[int, dict[str, Any]]:
        """``(index used, item)``: an item whose audio fails to decode is skipped (recorded in
        ``skipped``) and the next loadable one is returned instead, so a run never stops."""
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            if i in self._bad:
                continue
            wav = self._load_wav(i)
            if wav is None:
                continue
            item = self.items[i]
            out: dict[str, Any] = {
                "wav": wav,
                "wav_length": int(wav.shape[0]),
                "text": item.text,
                "speaker": item.speaker,
                "path": str(item.path),
            }
            if self.load_conditioning:
                out["conditioning"] = self._conditioning(i, wav)
            return i, out
        raise RuntimeError(
            f"paired_voice_audio ({self.phase}): none of the {len(self.items)} "
            f"items could be decoded; see the skipped reasons: "
            f"{self.skip_counts()}"
        )

    def _load_wav(self, i: int) -> torch.Tensor | None:
        try:
            wav, _ = load_audio(self.items[i].path, self.sample_rate)
        except AudioError as e:
            self._bad.add(i)
            reason = f"decode failed ({e.reason}): {e}"
            self.skipped.append((self.items[i].id, reason))
            log.warning("paired_voice_audio: skipping %s: %s", self.items[i].id, reason)
            return None
        if self.max_wav_length is not None:
            wav = wav[: self.max_wav_length]  # resampling may round one sample past the screen
        return wav

    def _conditioning(self, index: int, wav: torch.Tensor) -> torch.Tensor:
        """[N, conditioning_length] clips from other utterances of the same speaker (this one
        when the speaker has no other), chosen and cropped by a generator seeded by
        (seed, index) so that an item always gets the same clips."""
        g = generator(self.seed, index)
        pool = self._by_speaker[self.items[index].speaker]
        order = torch.randperm(len(pool), generator=g).tolist()
        others = [pool[k] for k in order if pool[k] != index and pool[k] not in self._bad]
        clips = []
        for n in range(self.num_conditioning):
            source = self._load_wav(others[n % len(others)]) if others else None
            clips.append(self._crop(wav if source is None else source, g))
        return torch.stack(clips)

    def _crop(self, wav: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        size = self.conditioning_length
        if wav.shape[0] > size:
            start = int(torch.randint(0, wav.shape[0] - size + 1, (1,), generator=g))
            return wav[start : start + size]
        return torch.nn.functional.pad(wav, (0, size - wav.shape[0]))

    # ----------------------------------------------------------------------------- batching
    @property
    def batch_keys(self) -> tuple[str, ...]:
        keys = ("wav", "wav_lengths", "text", "speaker", "path")
        return keys + ("conditioning",) if self.load_conditioning else keys

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Zero-pad ``wav`` to the longest item: ``wav`` [B, T], ``wav_lengths`` [B] long,
        ``conditioning`` [B, N, L]; text/speaker/path as lists."""
        wav, lengths = pad_batch([it["wav"] for it in items])
        batch: dict[str, Any] = {
            "wav": wav,
            "wav_lengths": lengths,
            "text": [it["text"] for it in items],
            "speaker": [it["speaker"] for it in items],
            "path": [it["path"] for it in items],
        }
        if "conditioning" in items[0]:
            batch["conditioning"] = torch.stack([it["conditioning"] for it in items])
        return batch

    # ---------------------------------------------------------------------------- summaries
    def durations(self) -> list[float]:
        """Seconds per item, from the file headers."""
        return list(self._durations)

    def speakers(self) -> list[str]:
        """Speaker of each item."""
        return [item.speaker for item in self.items]

    def skip_counts(self) -> dict[str, int]:
        """Skipped items per reason category, most frequent first."""
        return dict(Counter(reason_category(r) for _, r in self.skipped).most_common())


# ---------------------------------------------------------------------------------- the CLI
def dataset_from_options(opt: dict, phase: str) -> PairedVoiceAudioDataset:
    """Build ``datasets.<phase>`` of loaded options, validated as the trainer validates it."""
    source = opt.get("_file")
    spec = require_phase(validate_datasets(opt), phase, source)
    if not issubclass(spec.cls, PairedVoiceAudioDataset):
        raise ConfigError(
            [
                (
                    f"datasets.{phase}.mode",
                    f"is {spec.mode!r}; this check reads 'paired_voice_audio' datasets only",
                )
            ],
            source,
        )
    return build_dataset(spec, phase)


def histogram(values: list[float], bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram lines ``  lo -  hi s | #### count``."""
    if not values:
        return ["  (no items)"]
    counts, edges = np.histogram(values, bins=bins if max(values) > min(values) else 1)
    top = max(int(counts.max()), 1)
    return [
        f"  {lo:7.2f} - {hi:7.2f} s | {'#' * round(width * c / top):<{width}} {c}"
        for lo, hi, c in zip(edges[:-1], edges[1:], counts)
    ]


def report(dataset: PairedVoiceAudioDataset, top_speakers: int = 10) -> str:
    """Counts, hours, speakers, a duration histogram and every skipped item with its reason."""
    durations = dataset.durations()
    speakers = Counter(dataset.speakers())
    total = sum(durations)
    lines = [
        f"items: {len(dataset)} (skipped {len(dataset.skipped)})",
        f"total: {total / 3600:.3f} hours ({total:.1f} s)"
        + (
            f"; {min(durations):.2f} to {max(durations):.2f} s per item, mean "
            f"{total / len(durations):.2f} s"
            if durations
            else ""
        ),
        f"speakers: {len(speakers)}; top: "
        + ", ".join(f"{s} ({n})" for s, n in speakers.most_common(top_speakers)),
        "durations:",
        *histogram(durations),
        f"skipped items: {len(dataset.skipped)}",
    ]
    lines += [f"  {uid}: {reason}" for uid, reason in dataset.skipped]
    lines.append("skipped per reason:" + ("" if dataset.skipped else " (none)"))
    lines += [f"  {reason}: {n}" for reason, n in dataset.skip_counts().items()]
    return "\n".join(lines)


def write_samples(dataset: PairedVoiceAudioDataset, out: Path, n: int) -> list[Path]:
    """Write ``n`` items spread over the dataset as ``<id>.wav`` + ``<id>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    picks = sorted({round(k * (len(dataset) - 1) / max(n - 1, 1)) for k in range(n)})
    written = []
    for index in picks[: len(dataset)]:
        used, item = dataset.load_item(index)
        name = re.sub(r"[^\w.-]+", "_", dataset.items[used].id)
        save_audio(out / f"{name}.wav", item["wav"], dataset.sample_rate)
        mel = mel_spectrogram(item["wav"], dataset.sample_rate)
        save_mel_png(out / f"{name}.png", mel, title=f"{item['speaker']}: {item['text'][:80]}")
        written += [out / f"{name}.wav", out / f"{name}.png"]
    return written


def main(argv: list[str] | None = None) -> int:
    p = experiment_parser(
        "Check a paired_voice_audio dataset: counts, durations, skipped "
        "items, sample wav/png files."
    )
    p.add_argument("--phase", default="train", help="which datasets.<phase> to check")
    p.add_argument("--samples", type=int, default=4, help="items to write as wav + png")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the samples (default: <run folder>/dataset_check/<phase>)",
    )
    args = p.parse_args(argv)
    # bad options raise ConfigError, an empty dataset a DataError (see data.spec.build_dataset)
    loaded = load_cli(args, lambda opt: (opt, dataset_from_options(opt, args.phase)))
    opt, dataset = loaded
    print(f"{opt['_file']}: datasets.{args.phase} (paired_voice_audio)")
    print(report(dataset))
    if args.samples > 0:
        out = args.out or _default_out(opt) / "dataset_check" / args.phase
        files = write_samples(dataset, out, args.samples)
        print(f"wrote {len(files) // 2} samples (wav + mel png) to {out}")
    return 0


def _default_out(opt: dict) -> Path:
    """The run folder (``path.root`` or ``<yaml folder>/<name>``), else the temp folder."""
    base = Path(opt["_base_dir"])
    root = (opt.get("path") or {}).get("root")
    if root:
        return base / Path(root).expanduser()
    if opt.get("name"):
        return base / str(opt["name"])
    return Path(tempfile.gettempdir())
