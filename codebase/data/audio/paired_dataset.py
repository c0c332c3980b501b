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

import json
import logging
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from data import register_dataset
from data.audio.bpe_tokenizer import BpeTokenizer, VocabError, load_vocab
from data.audio.corpus import reason_category, screen, split_fraction
from data.audio.fetchers import fetch
from data.audio.text_cleaners import Cleaners
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
from utils.schema import ConfigError, PositiveInt, Problems, Runtime
from utils.seed import generator

log = logging.getLogger(__name__)


@register_dataset("paired_voice_audio")
class PairedVoiceAudioDataset(Dataset):
    """Audio + transcript + speaker from LJSpeech, LibriTTS or TSV corpora (DLAS options).

    With ``use_bpe_tokenizer`` the transcripts are also BPE tokens, batched under DLAS's keys
    (``padded_text``, ``text_lengths``, ``real_text``, ``filenames``,
    ``conditioning_contains_self``) for Tortoise's GPT; items whose text has characters the
    vocabulary lacks ([UNK]) or nothing left after cleaning are skipped with a reason.

    Args:
        path: corpus folder or index file, or a list of them (relative: to the YAML's folder).
        fetcher_mode: how to read each path: ``lj`` (LJSpeech metadata.csv or a DLAS
            ``path|text`` filelist), ``libritts``, ``tsv`` (or a list).
        sample_rate: every clip is resampled to this rate.
        max_wav_length: longest clip kept, in samples at ``sample_rate`` (None: no limit).
        min_duration: shortest clip kept, in seconds (None: no limit); a blip of a few
            milliseconds is no utterance (``prepare`` has its own, 0.3 s by default).
        max_text_length: longest transcript kept, in characters, or in BPE tokens when
            ``use_bpe_tokenizer`` (None: no limit).
        use_bpe_tokenizer: also encode the text with a BPE vocabulary (DLAS keys, above).
        tokenizer_vocab: a ``tokenizers`` JSON vocabulary (None: Tortoise's, English only;
            train another with ``python -m data.audio.bpe_tokenizer train``).
        text_cleaners: text cleaning before BPE: ``english`` (Tortoise's) or ``basic``
            (lowercase only, for a vocabulary trained on another language).
        load_aligned_codes: DLAS's precomputed aligned codes; not supported (must be false).
        load_conditioning: also return ``conditioning`` clips.
        num_conditioning_candidates: clips per item (N).
        conditioning_length: samples per clip (cropped or zero-padded).
        conditioning_source: ``speaker``: crops of other clips of the same speaker (the clip
            itself only when the speaker has no other), so the model cannot copy its target;
            ``self``: crops of the clip itself, as DLAS does without ``similarities.pth``.
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
        max_text_length: PositiveInt | None = None,
        min_duration: float | None = 0.1,
        use_bpe_tokenizer: bool = False,
        tokenizer_vocab: Path | None = None,
        text_cleaners: Cleaners = "english",
        load_aligned_codes: bool = False,
        load_conditioning: bool = False,
        num_conditioning_candidates: int = 1,
        conditioning_length: int = 44000,
        conditioning_source: Literal["speaker", "self"] = "speaker",
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
        if load_aligned_codes:
            raise ValueError(ALIGNED_CODES_UNSUPPORTED)
        self.sample_rate, self.max_wav_length = sample_rate, max_wav_length
        self.load_conditioning = load_conditioning
        self.conditioning_source = conditioning_source
        self.tokenizer = BpeTokenizer(tokenizer_vocab, text_cleaners) if use_bpe_tokenizer else None
        self.num_conditioning = num_conditioning_candidates
        self.conditioning_length = conditioning_length
        self.phase, self.seed = phase, seed

        fetched, self.skipped = fetch(fetcher_mode, path)
        if val_fraction > 0:  # split before screening: only this phase's audio is opened
            want_val = phase == "val"
            fetched = [u for u in fetched if (split_fraction(u.id) < val_fraction) == want_val]
        tokenizer = self.tokenizer
        self.items, self._durations, bad = screen(
            fetched,
            sample_rate,
            max_wav_length,
            None if tokenizer else max_text_length,
            min_duration=min_duration,
            text_check=(lambda t: tokenizer.problem(t, max_text_length)) if tokenizer else None,
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
            if self.tokenizer is not None:
                out["tokens"] = torch.tensor(self.tokenizer.encode(item.text), dtype=torch.long)
            if self.load_conditioning:
                out["conditioning"], out["conditioning_contains_self"] = self._conditioning(i, wav)
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

    def _conditioning(self, index: int, wav: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``([N, conditioning_length] clips, whether any is cropped from the item itself)``.
        Clips come from other utterances of the same speaker (this one when the speaker has
        no other, or with ``conditioning_source: self``), chosen and cropped by a generator
        seeded by (seed, index) so that an item always gets the same clips."""
        g = generator(self.seed, index)
        others: list[int] = []
        if self.conditioning_source == "speaker":
            pool = self._by_speaker[self.items[index].speaker]
            order = torch.randperm(len(pool), generator=g).tolist()
            others = [pool[k] for k in order if pool[k] != index and pool[k] not in self._bad]
        clips, contains_self = [], False
        for n in range(self.num_conditioning):
            source = self._load_wav(others[n % len(others)]) if others else None
            contains_self |= source is None
            clips.append(self._crop(wav if source is None else source, g))
        return torch.stack(clips), contains_self

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
        if self.tokenizer is not None:
            keys += ("padded_text", "text_lengths", "real_text", "filenames")
        if self.load_conditioning:
            keys += ("conditioning", "conditioning_contains_self")
        return keys

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Zero-pad ``wav`` to the longest item: ``wav`` [B, T], ``wav_lengths`` [B] long,
        ``conditioning`` [B, N, L], ``conditioning_contains_self`` [B] bool; text/speaker/path
        as lists. With BPE: ``padded_text`` [B, L] long token ids, 0-padded ([STOP]) to the
        longest item, ``text_lengths`` [B] long, and DLAS's ``real_text`` (= ``text``) and
        ``filenames`` (= ``path``) lists."""
        wav, lengths = pad_batch([it["wav"] for it in items])
        batch: dict[str, Any] = {
            "wav": wav,
            "wav_lengths": lengths,
            "text": [it["text"] for it in items],
            "speaker": [it["speaker"] for it in items],
            "path": [it["path"] for it in items],
        }
        if "tokens" in items[0]:
            batch["padded_text"], batch["text_lengths"] = pad_batch([it["tokens"] for it in items])
            batch["real_text"], batch["filenames"] = batch["text"], batch["path"]
        if "conditioning" in items[0]:
            batch["conditioning"] = torch.stack([it["conditioning"] for it in items])
            batch["conditioning_contains_self"] = torch.tensor(
                [it["conditioning_contains_self"] for it in items], dtype=torch.bool
            )
        return batch

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems) -> None:
        """Validation-time checks: aligned codes, and the vocabulary file (loaded)."""
        if options.get("load_aligned_codes"):
            problems.add(f"{path}.load_aligned_codes", ALIGNED_CODES_UNSUPPORTED)
        vocab = options.get("tokenizer_vocab")
        if vocab is not None and not options.get("use_bpe_tokenizer"):
            log.warning("%s.tokenizer_vocab has no effect without use_bpe_tokenizer: true", path)
        elif vocab is not None:
            try:
                load_vocab(Path(vocab))
            except VocabError as e:
                problems.add(f"{path}.tokenizer_vocab", str(e))

    def checkpoint_metadata(self) -> dict[str, str]:
        """The text tokenizer (vocabulary, cleaners), saved in every checkpoint of a model
        trained on this data, for inference."""
        if self.tokenizer is None:
            return {}
        return {"text_tokenizer": json.dumps(self.tokenizer.config())}

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


ALIGNED_CODES_UNSUPPORTED = (
    "load_aligned_codes: true is not supported: DLAS reads precomputed aligned codes from a "
    "third 'tsv' column, which here holds the speaker. Remove the option (or set it false); "
    "Tortoise's GPT gets its codes from the wav through the discrete_token injector"
)


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
