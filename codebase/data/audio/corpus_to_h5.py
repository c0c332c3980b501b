"""A raw corpus, prepared once into ``data.h5``: codec codes, phoneme ids, text, speaker,
duration (run by ``python -m data.audio.prepare`` and by ``hdf5_codes`` datasets).

An existing file is brought up to date: items already in it are skipped. Work goes to
``data.h5.partial`` and is committed every few items, so a killed run resumes where it
stopped; the finished file replaces ``data.h5`` atomically, so it is never half-written.

Layout (all items concatenated; item i is rows ``offsets[i]:offsets[i+1]``):
``codes`` int16 [frames, levels], ``code_offsets``, ``phonemes`` int16 (ids, no bos/eos),
``phoneme_offsets``, ``ids``/``texts``/``speakers`` (strings), ``durations`` float32 (s);
attributes: ``codec`` and ``phonemizer`` (JSON configs; a codec file's path is relative to the
data file's folder), ``prepare_options`` (what the options asked for, see
:mod:`data.audio.h5_options`), ``vocab`` (JSON symbol map), ``sample_rate``, ``frame_rate``,
``n_levels``, ``codebook_size``, ``n_items``, ``format_version``.

An existing file made with other codec or phonemizer options is refused (:class:`DataError`
naming each changed key), never extended with codes of another kind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from data.audio.corpus import duration_problem, reason_category, screen
from data.audio.fetchers import FETCHERS, fetch
from data.audio.h5_options import (
    RECORD_ATTR,
    PrepareOptions,
    check_matches,
    codec_checkpoint,
    load_base_vocab,
    portable_codec_config,
    record_for_file,
    resolve_codec_config,
)
from data.audio.phonemes import PhonemeVocab, Phonemizer, supported_languages
from models.audio.codecs import CODECS, build_codec
from models.audio.codecs.mel_rvq import MelRVQCodec
from utils.audio import AudioError, load_audio
from utils.errors import DataError
from utils.registry import did_you_mean
from utils.schema import Problems, bind_options, lookup

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_STR = h5py.string_dtype()


def check_prepare(opts: PrepareOptions, path: str, problems: Problems) -> None:
    """The names and options inside a ``prepare:`` section (fetcher, codec and its options,
    language), checked at validation whether or not the data file exists yet."""
    modes = opts.fetcher_mode if isinstance(opts.fetcher_mode, list) else [opts.fetcher_mode]
    for mode in modes:
        lookup(FETCHERS, mode, f"{path}.fetcher_mode", problems)
    codec = lookup(CODECS, opts.codec, f"{path}.codec", problems)
    if codec is not None:
        bind_options(codec, opts.codec_options, f"{path}.codec_options", problems)
    if opts.base_vocab is not None:
        try:
            PhonemeVocab.from_json(load_base_vocab(opts.base_vocab))
        except (DataError, ValueError, TypeError, KeyError) as e:
            problems.add(f"{path}.base_vocab", str(e))
    try:
        known = supported_languages()
    except RuntimeError as e:  # no espeak: reported when preparing
        log.debug("%s.language not checked: %s", path, e)
        return
    if opts.language not in known:
        problems.add(
            f"{path}.language",
            f"unknown espeak language {opts.language!r}{did_you_mean(opts.language, known)}",
        )


@dataclass
class PrepareReport:
    items_added: int = 0
    items_total: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio prepared per second of wall time."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def skip_counts(self) -> dict[str, int]:
        """Skipped items per reason category, most frequent first."""
        return dict(Counter(reason_category(r) for _, r in self.skipped).most_common())

    def describe(self) -> str:
        """Counts, throughput and skips per reason (each skipped item is in ``skipped``)."""
        counts = self.skip_counts()
        lines = [
            f"{self.items_added} item(s) added ({self.audio_seconds / 3600:.2f} h of audio "
            f"in {self.wall_seconds:.1f} s, {self.realtime_factor:.1f}x real time); "
            f"{self.items_total} item(s) in the file"
        ]
        if counts:
            lines.append("skipped: " + ", ".join(f"{n} {r}" for r, n in counts.items()))
        return "\n".join(lines)


def codec_options_for(opts: PrepareOptions, h5_path: Path) -> dict[str, Any]:
    """The codec's options, with mel_rvq's fitted file placed beside data.h5 by default."""
    options = dict(opts.codec_options)
    checkpoint = codec_checkpoint(opts, h5_path)
    if checkpoint is not None:
        options["checkpoint"] = str(checkpoint)
    return options


def check_data_file(h5_path: Path, opts: PrepareOptions) -> None:
    """Raise :class:`DataError` when ``h5_path`` was prepared with other codec or
    phonemizer options than ``opts`` (see :mod:`data.audio.h5_options`)."""
    with h5py.File(h5_path, "r") as f:
        check_matches(f.attrs, opts, h5_path)


def prepare(h5_path: Path, opts: PrepareOptions, progress: bool = True) -> PrepareReport:
    """Create or update ``h5_path`` from the corpus described by ``opts``."""
    t0 = time.perf_counter()
    report = PrepareReport()
    partial = h5_path.with_name(h5_path.name + ".partial")
    _check_existing(h5_path, partial, opts)
    items, report.skipped = fetch(opts.fetcher_mode, opts.path)
    # headers only (fast), so a re-run does not count permanently bad items as work left
    items, _, screened_out = screen(
        items, sample_rate=16000, min_duration=opts.min_duration, max_duration=opts.max_duration
    )
    report.skipped += screened_out
    if not items:
        raise DataError(
            f"no usable items in {opts.path} (fetcher_mode {opts.fetcher_mode}); "
            f"skipped: {report.skip_counts()}, e.g. {report.skipped[:5]}"
        )
    phonemizer = Phonemizer(
        language=opts.language,
        preserve_punctuation=opts.preserve_punctuation,
        with_stress=opts.with_stress,
    )
    if h5_path.exists() and not partial.exists():
        done = set(read_ids(h5_path))
        if all(u.id in done for u in items):
            report.items_total = len(done)
            report.wall_seconds = time.perf_counter() - t0
            return report
        shutil.copyfile(h5_path, partial)  # add new items to a copy; replace when complete
    codec = _codec(opts, h5_path, items, progress)
    with _open_partial(partial, codec, phonemizer, record_for_file(opts, h5_path)) as f:
        done = set(_strings(f["ids"][: f.attrs["n_items"]]))
        todo = [u for u in items if u.id not in done]
        symbols = _phonemize(phonemizer, todo, progress)
        vocab = _extend_vocab(f, symbols, opts.base_vocab)
        writer = _Writer(f, opts.flush_every)
        bar = tqdm(
            todo,
            desc=f"preparing {h5_path.name}",
            unit="item",
            disable=not progress,
            mininterval=1.0,
        )
        for u, syms in zip(bar, symbols):
            reason = _add_item(writer, codec, vocab, u, syms, opts, report)
            if reason:
                report.skipped.append((u.id, reason))
        writer.flush()
        report.items_total = int(f.attrs["n_items"])
    os.replace(partial, h5_path)
    report.wall_seconds = time.perf_counter() - t0
    return report


def _add_item(
    writer: _Writer,
    codec: Any,
    vocab: Any,
    u: Any,
    symbols: list[str],
    opts: PrepareOptions,
    report: PrepareReport,
) -> str | None:
    """Encode one utterance and queue it; returns a skip reason or None."""
    if not symbols:
        return "no phonemes (empty text)"
    try:
        wav, _ = load_audio(u.path, codec.sample_rate)
    except AudioError as e:
        return getattr(e, "reason", "unreadable audio")
    duration = wav.numel() / codec.sample_rate
    reason = duration_problem(duration, opts.min_duration, opts.max_duration)
    if reason:
        return reason
    codes = codec.encode(wav.to(opts.device))  # [levels, frames]
    ids = vocab.encode(symbols, add_bos_eos=False)
    writer.add(u, codes.t().to("cpu", torch.int16).numpy(), np.asarray(ids, np.int16), duration)
    report.items_added += 1
    report.audio_seconds += duration
    return None


class _Writer:
    """Buffers items and appends them to the resizable datasets, committing ``n_items``."""

    def __init__(self, f: h5py.File, flush_every: int) -> None:
        self.f, self.flush_every, self.buffer = f, flush_every, []

    def add(self, u: Any, codes: np.ndarray, phonemes: np.ndarray, duration: float) -> None:
        self.buffer.append((u, codes, phonemes, duration))
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        f, n = self.f, int(self.f.attrs["n_items"])
        codes = np.concatenate([b[1] for b in self.buffer])
        phon = np.concatenate([b[2] for b in self.buffer])
        c0, p0 = int(f["code_offsets"][n]), int(f["phoneme_offsets"][n])
        c_off = c0 + np.cumsum([len(b[1]) for b in self.buffer])
        p_off = p0 + np.cumsum([len(b[2]) for b in self.buffer])
        _write(f["codes"], c0, codes)
        _write(f["phonemes"], p0, phon)
        _write(f["code_offsets"], n + 1, c_off)
        _write(f["phoneme_offsets"], n + 1, p_off)
        _write(f["ids"], n, np.array([b[0].id for b in self.buffer], dtype=object))
        _write(f["texts"], n, np.array([b[0].text for b in self.buffer], dtype=object))
        _write(f["speakers"], n, np.array([b[0].speaker for b in self.buffer], dtype=object))
        _write(f["durations"], n, np.array([b[3] for b in self.buffer], np.float32))
        f.flush()
        f.attrs["n_items"] = n + len(self.buffer)  # the commit point: rows past it are ignored
        f.flush()
        self.buffer.clear()


def _write(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    end = start + len(values)
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    ds[start:end] = values


def _check_existing(h5_path: Path, partial: Path, opts: PrepareOptions) -> None:
    """Refuse a data file (or the partial file of a killed run) prepared with other options,
    before any work; an unreadable partial file is left for :class:`_open_partial`."""
    if h5_path.exists():
        check_data_file(h5_path, opts)
    if partial.exists():
        try:
            f = h5py.File(partial, "r")
        except OSError:
            return
        with f:
            check_matches(f.attrs, opts, h5_path)


class _open_partial:
    """Open (or create) the partial file; a corrupt one from a killed run is started over."""

    def __init__(self, path: Path, codec: Any, phonemizer: Any, record: str) -> None:
        self.path, self.codec, self.phonemizer, self.record = path, codec, phonemizer, record

    def __enter__(self) -> h5py.File:
        if self.path.exists():
            try:
                self.f = h5py.File(self.path, "r+")
                _drop_uncommitted(self.f)
                _add_record(self.f, self.record, self.path.parent)
                return self.f
            except OSError:
                log.warning("%s is unreadable (a killed run?); starting it over", self.path)
                self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = f = h5py.File(self.path, "w")
        levels = self.codec.n_levels
        f.create_dataset(
            "codes", (0, levels), np.int16, maxshape=(None, levels), chunks=(4096, levels)
        )
        f.create_dataset("phonemes", (0,), np.int16, maxshape=(None,), chunks=(8192,))
        for name in ("code_offsets", "phoneme_offsets"):
            f.create_dataset(name, (1,), np.int64, maxshape=(None,), chunks=(1024,), data=[0])
        for name in ("ids", "texts", "speakers"):
            f.create_dataset(name, (0,), _STR, maxshape=(None,), chunks=(1024,))
        f.create_dataset("durations", (0,), np.float32, maxshape=(None,), chunks=(1024,))
        f.attrs.update(
            format_version=FORMAT_VERSION,
            n_items=0,
            codec=json.dumps(portable_codec_config(self.codec.config(), self.path.parent)),
            phonemizer=json.dumps(self.phonemizer.config()),
            prepare_options=self.record,
            sample_rate=self.codec.sample_rate,
            frame_rate=self.codec.frame_rate,
            n_levels=levels,
            codebook_size=self.codec.codebook_size,
        )
        return f

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _add_record(f: h5py.File, record: str, folder: Path) -> None:
    """Bring a file written before ``prepare_options`` existed (and found to match) up to
    date: the record, and its codec file's path relative to the folder."""
    if RECORD_ATTR not in f.attrs:
        f.attrs[RECORD_ATTR] = record
        codec = resolve_codec_config(json.loads(f.attrs["codec"]), folder)
        f.attrs["codec"] = json.dumps(portable_codec_config(codec, folder))


def _drop_uncommitted(f: h5py.File) -> None:
    """Cut every dataset back to the last commit (``n_items``) of a killed run."""
    n = int(f.attrs["n_items"])
    for name, rows in (
        ("code_offsets", n + 1),
        ("phoneme_offsets", n + 1),
        ("ids", n),
        ("texts", n),
        ("speakers", n),
        ("durations", n),
    ):
        f[name].resize(rows, axis=0)
    f["codes"].resize(int(f["code_offsets"][n]), axis=0)
    f["phonemes"].resize(int(f["phoneme_offsets"][n]), axis=0)


def _extend_vocab(
    f: h5py.File, symbol_lists: list[list[str]], base_vocab: Path | None = None
) -> Any:
    """The file's vocabulary plus any new symbols (appended, so existing ids stay valid); a new
    file starts from ``base_vocab`` (a checkpoint's, for fine-tuning) when given."""
    new = PhonemeVocab.build(symbol_lists)
    if "vocab" in f.attrs:
        old = PhonemeVocab.from_json(f.attrs["vocab"])
        vocab = old.extended(new.id_to_symbol)
    elif base_vocab is not None:
        base = PhonemeVocab.from_json(load_base_vocab(base_vocab))
        vocab = base.extended(new.id_to_symbol)
    else:
        vocab = new
    f.attrs["vocab"] = vocab.to_json()
    return vocab


def _phonemize(phonemizer: Any, items: list[Any], progress: bool) -> list[list[str]]:
    out: list[list[str]] = []
    chunk = 256
    bar = tqdm(
        total=len(items), desc="phonemizing", unit="item", disable=not progress, mininterval=1.0
    )
    for start in range(0, len(items), chunk):
        texts = [u.text for u in items[start : start + chunk]]
        out += phonemizer.phonemize_symbols(texts)
        bar.update(len(texts))
    bar.close()
    return out


def _codec(opts: PrepareOptions, h5_path: Path, items: list[Any], progress: bool) -> Any:
    """Build the codec; fit mel_rvq on the corpus first when its file does not exist yet."""
    options = codec_options_for(opts, h5_path)
    if opts.codec == "mel_rvq" and not Path(options["checkpoint"]).is_file():
        partial = h5_path.with_name(h5_path.name + ".partial")
        if h5_path.exists() or partial.exists():  # a new fit would give other codes
            raise DataError(
                f"{h5_path} was encoded with the fitted mel_rvq codec {options['checkpoint']}, "
                f"which is missing: restore it (or set prepare.codec_checkpoint to where it "
                f"is), or delete {h5_path} (and {partial.name}) to prepare the data anew"
            )
        fit_mel_rvq(Path(options["checkpoint"]), items, opts, progress)
    return build_codec(opts.codec, **options).to(opts.device).eval()


def fit_mel_rvq(out: Path, items: list[Any], opts: PrepareOptions, progress: bool) -> None:
    """Fit the mel_rvq quantiser on up to ``fit_minutes`` of the corpus (spread over items)."""
    arch = {k: v for k, v in opts.codec_options.items() if k not in ("checkpoint", "pretrained")}
    sample_rate = arch.get("sample_rate", 16000)
    order = np.random.default_rng(0).permutation(len(items))
    wavs, seconds = [], 0.0
    for i in tqdm(
        order, desc="loading audio to fit mel_rvq", disable=not progress, mininterval=1.0
    ):
        if seconds >= opts.fit_minutes * 60:
            break
        try:
            wav, _ = load_audio(items[i].path, sample_rate)
        except AudioError:
            continue
        wavs.append(wav)
        seconds += wav.numel() / sample_rate
    if not wavs:
        raise ValueError("no readable audio to fit the mel_rvq codec on")
    log.info("fitting mel_rvq on %.1f min of audio -> %s", seconds / 60, out)
    MelRVQCodec.fit(wavs, out, iters=opts.fit_iters, **arch)


def _strings(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_ids(h5_path: Path) -> list[str]:
    with h5py.File(h5_path, "r") as f:
        return _strings(f["ids"][: f.attrs["n_items"]])
