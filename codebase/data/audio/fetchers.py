"""Corpus fetchers: read a corpus index into (audio path, text, speaker) items.

A fetcher only reads the index (``metadata.csv``, transcript files, a TSV); it does not open
audio. Lines it cannot make sense of (not valid UTF-8, the wrong number of fields, an empty
id) are returned as ``("<file>:<line>", reason)`` skips and the rest of the corpus is read:
a bad line is a bad item, not a bad corpus. Checks that need the audio file (missing,
unreadable, too short or long), empty texts and repeated ids are the dataset's job
(:mod:`data.audio.corpus`), so that every consumer screens items the same way.

Fetchers are registered by DLAS's ``fetcher_mode`` name; add one with
``@FETCHERS.register("name")`` on a function ``(root: Path) -> (items, skipped)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data.audio.demo_corpus import build_demo_corpus, build_new_voice_corpus
from utils.registry import Registry

Skipped = list[tuple[str, str]]
Fetcher = Callable[[Path], tuple[list["Utterance"], Skipped]]

FETCHERS: Registry[Fetcher] = Registry("fetcher_mode")


@dataclass(frozen=True)
class Utterance:
    """One corpus entry: its audio file, transcript, speaker name and corpus-wide id."""

    path: Path
    text: str
    speaker: str
    id: str
    source: str = field(default="", compare=False)  # "<index file>:<line>", for messages


def _read_lines(file: Path) -> tuple[list[tuple[int, str]], Skipped]:
    """The numbered lines of a corpus index, and a skip for each line that is not valid
    UTF-8 (that line only: the rest of the file is still read)."""
    if not file.is_file():
        raise FileNotFoundError(
            f"corpus index {file} does not exist; check `path` in the dataset options"
        )
    lines, skipped = [], []
    # bytes.splitlines splits at \n, \r\n and \r only, so line numbers match an editor's
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            # utf-8-sig: drops the byte-order mark spreadsheet tools put at the start
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as e:
            skipped.append((f"{file}:{number}", not_utf8(raw, e)))
    return lines, skipped


def not_utf8(data: bytes, e: UnicodeDecodeError) -> str:
    """``"not valid UTF-8: byte 0xe9 at column 12"`` (1-based byte column; the line too
    when ``data`` holds several)."""
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    where = f"line {line}, column {column}" if b"\n" in data else f"column {column}"
    return f"not valid UTF-8: byte 0x{data[e.start]:02x} at {where}"


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


@FETCHERS.register("lj")
def fetch_lj(root: Path) -> tuple[list[Utterance], Skipped]:
    """LJSpeech ``metadata.csv`` or a DLAS / ai-voice-cloning filelist, told apart per file.

    - LJSpeech: ``root/metadata.csv`` (or that file itself) with ``id|text|normalized text``
      lines and audio in ``<its folder>/wavs/<id>.wav``; the normalized text is preferred.
    - Filelist (DLAS's ``lj`` reading, e.g. ai-voice-cloning's ``train.txt``): ``audio
      path|text[|type]`` lines, the audio path relative to the list's folder (or absolute).
      A file is a filelist when the first column of its first line ends in an audio suffix.

    One speaker per file, named after the file's folder.
    """
    root = Path(root)
    csv = root if root.is_file() or root.suffix in (".csv", ".txt") else root / "metadata.csv"
    lines, skipped = _read_lines(csv)
    first = next((line for _, line in lines if line.strip()), "")
    if Path(first.split("|", 1)[0].strip()).suffix.lower() in AUDIO_SUFFIXES:
        return _filelist_items(csv, lines, skipped)
    folder = csv.parent
    speaker = folder.resolve().name or "lj"
    items = []
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("|")
        uid = fields[0].strip()
        if len(fields) not in (2, 3) or not uid:
            problem = "an empty id" if len(fields) in (2, 3) else f"{len(fields)} field(s)"
            skipped.append(
                (
                    f"{csv}:{number}",
                    f"malformed line: expected id|text|normalized text, got {problem}",
                )
            )
            continue
        normalized = fields[2].strip() if len(fields) > 2 else ""
        text = normalized or fields[1].strip()  # empty texts are left for the dataset to count
        wav = folder / "wavs" / f"{uid}.wav"
        items.append(Utterance(wav, text, speaker, uid, f"{csv}:{number}"))
    return items, skipped


def _filelist_items(
    file: Path, lines: list[tuple[int, str]], skipped: Skipped
) -> tuple[list[Utterance], Skipped]:
    """Items of a ``path|text[|type]`` filelist (the third column, DLAS's type, is ignored)."""
    speaker = file.parent.resolve().name or "filelist"
    items = []
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("|")
        rel = fields[0].strip()
        if len(fields) not in (2, 3) or not rel:
            problem = "an empty audio path" if len(fields) in (2, 3) else f"{len(fields)} field(s)"
            skipped.append(
                (f"{file}:{number}", f"malformed line: expected audio path|text, got {problem}")
            )
            continue
        audio = Path(rel).expanduser()
        audio = audio if audio.is_absolute() else file.parent / audio
        uid = str(Path(rel).with_suffix("")).replace("\\", "/")
        items.append(Utterance(audio, fields[1].strip(), speaker, uid, f"{file}:{number}"))
    return items, skipped


@FETCHERS.register("libritts")
def fetch_libritts(root: Path) -> tuple[list[Utterance], Skipped]:
    """LibriTTS: ``<speaker>/<chapter>/<id>.wav`` with ``<id>.normalized.txt`` beside each wav
    (else ``<id>.original.txt``). Searched recursively, so ``root`` may be the corpus, a split
    (``train-clean-100``) or one speaker's folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"LibriTTS folder {root} does not exist; check `path` in the dataset options"
        )
    items, skipped = [], []
    for wav in sorted(root.rglob("*.wav")):
        uid = wav.stem
        transcript = next(
            (
                t
                for t in (
                    wav.with_name(f"{uid}.normalized.txt"),
                    wav.with_name(f"{uid}.original.txt"),
                )
                if t.is_file()
            ),
            None,
        )
        if transcript is None:
            skipped.append(
                (
                    str(wav),
                    f"missing transcript: no {uid}.normalized.txt or {uid}.original.txt beside it",
                )
            )
            continue
        try:
            data = transcript.read_bytes()
            text = " ".join(data.decode("utf-8").split())
        except OSError as e:
            skipped.append((str(transcript), f"unreadable transcript: {e}"))
            continue
        except UnicodeDecodeError as e:
            skipped.append((str(transcript), not_utf8(data, e)))
            continue
        # <speaker>/<chapter>/<id>.wav: the speaker folder is two levels up wherever the
        # search started (corpus, split, speaker or chapter folder).
        speaker = wav.parent.parent.name
        items.append(Utterance(wav, text, speaker, uid, str(transcript)))
    return items, skipped


TSV_HEADER = ["path", "text", "speaker"]


@FETCHERS.register("tsv")
def fetch_tsv(root: Path) -> tuple[list[Utterance], Skipped]:
    """A TSV of ``path<TAB>text<TAB>speaker`` (header line optional); relative audio paths
    are resolved against the TSV's folder. The id is the path without its suffix."""
    tsv = Path(root)
    items = []
    lines, skipped = _read_lines(tsv)
    for number, line in lines:
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if number == 1 and [f.lower() for f in fields] == TSV_HEADER:
            continue
        if len(fields) != 3 or not fields[0] or not fields[2]:
            skipped.append(
                (
                    f"{tsv}:{number}",
                    f"malformed line: expected 3 tab-separated "
                    f"columns path, text, speaker (path and speaker "
                    f"non-empty), got {len(fields)} column(s)",
                )
            )
            continue
        rel, text, speaker = fields
        audio = Path(rel).expanduser()
        audio = audio if audio.is_absolute() else tsv.parent / audio
        uid = str(Path(rel).with_suffix("")).replace("\\", "/")
        items.append(Utterance(audio, text, speaker, uid, f"{tsv}:{number}"))
    return items, skipped


def _demo_tsv(
    root: Path, mode: str, what: str, build: Callable[[Path], object]
) -> tuple[list[Utterance], Skipped]:
    """Read a generated corpus's ``train.tsv`` or ``heldout.tsv`` (``root``), building the
    corpus into its folder first when it is missing."""
    root = Path(root)
    if not root.is_file():
        if root.name not in ("train.tsv", "heldout.tsv"):
            raise ValueError(
                f"fetcher_mode {mode}: path must be {what}'s train.tsv or heldout.tsv, got {root}"
            )
        build(root.parent)
    return fetch_tsv(root)


@FETCHERS.register("demo")
def fetch_demo(root: Path) -> tuple[list[Utterance], Skipped]:
    """The offline demo corpus: ``path`` is its ``train.tsv`` or ``heldout.tsv``. When the corpus
    is missing it is built first (``data.audio.demo_corpus`` with its defaults, about a minute)."""
    return _demo_tsv(root, "demo", "a demo corpus", lambda out: build_demo_corpus(out))


@FETCHERS.register("demo_new_voice")
def fetch_demo_new_voice(root: Path) -> tuple[list[Utterance], Skipped]:
    """The fine-tuning demo's corpus (one voice the demo corpus lacks): ``path`` is its
    ``train.tsv`` or ``heldout.tsv``; a missing corpus is built first (``python -m
    data.audio.demo_corpus --new-voice`` with its defaults, a few seconds)."""
    return _demo_tsv(
        root, "demo_new_voice", "the new-voice corpus", lambda out: build_new_voice_corpus(out)
    )


def fetch(
    fetcher_mode: str | list[str], path: Path | str | list[Path] | list[str]
) -> tuple[list[Utterance], Skipped]:
    """Read one corpus or several: ``fetcher_mode`` and ``path`` are single values or lists of
    equal length (DLAS writes ``fetcher_mode: ['lj']``); one mode with several paths, or one
    path with several modes, is broadcast."""
    modes = [fetcher_mode] if isinstance(fetcher_mode, str) else list(fetcher_mode)
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not modes or not paths:
        raise ValueError("fetch: fetcher_mode and path must not be empty")
    if len(modes) != len(paths) and 1 not in (len(modes), len(paths)):
        raise ValueError(
            f"fetch: {len(modes)} fetcher_mode(s) {modes} for {len(paths)} path(s); "
            f"give one mode per path, or a single mode for all paths"
        )
    n = max(len(modes), len(paths))
    modes, paths = modes * (n // len(modes)), paths * (n // len(paths))
    items: list[Utterance] = []
    skipped: Skipped = []
    for mode, p in zip(modes, paths):
        fetcher = FETCHERS.get(mode, where="fetcher_mode")
        got, bad = fetcher(Path(p))
        items += got
        skipped += bad
    return items, skipped
