"""The ``prepare:`` options of a ``data.h5``, and whether an existing file was made with them.

The file records the options that shaped its codes and phonemes (attribute
``prepare_options``: codec, codec options with their defaults, a fingerprint of a fitted
``mel_rvq`` codec, and the phonemizer options). ``prepare`` and the ``hdf5_codes`` dataset
compare it with the options of the run, key by key, and refuse a file made otherwise: training
on codes of one codec with the options of another would fail silently.

Paths stored in the file are relative to its folder, so a data folder that is copied or moved
(with its fitted codec) is the same data: a file is told apart by the codec file's content,
never by where it lies. Files written before the record existed are compared on the codec and
phonemizer configs they hold.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.audio.codecs import CODECS
from utils.errors import DataError, UserError
from utils.io import file_sha256 as sha256_of_file
from utils.io import safetensors_metadata


@dataclass
class PrepareOptions:
    """``datasets.<phase>.prepare``: how to build the data file from a raw corpus."""

    fetcher_mode: str | list[str]  # lj | libritts | tsv (DLAS: a list, one per path)
    path: Path | list[Path]  # the raw corpus (folder, metadata.csv or .tsv)
    codec: str = "mel_rvq"  # encodec | vocos | dac | mel_rvq
    codec_options: dict = field(default_factory=dict)
    codec_checkpoint: Path | None = None  # mel_rvq: fitted file (default: beside data.h5)
    language: str = "en-us"  # espeak voice for phonemization
    preserve_punctuation: bool = True
    with_stress: bool = False
    min_duration: float = 0.3  # seconds; shorter items are skipped
    max_duration: float | None = 30.0  # seconds; longer items are skipped
    fit_minutes: float = 20.0  # mel_rvq: minutes of audio to fit the quantiser on
    fit_iters: int = 20  # mel_rvq: k-means iterations per level
    device: str = "cpu"  # where the codec runs ("cuda" speeds up encodec)
    flush_every: int = 64  # items per commit to the partial file
    # fine-tuning: start the phoneme vocabulary from a checkpoint's (a network file) or a
    # vocabulary JSON: its ids are kept, the data's new symbols appended
    base_vocab: Path | None = None


RECORD_ATTR = "prepare_options"
# Codec options that change decoding only, not the codes in the file.
DECODE_ONLY = frozenset({"griffin_lim_iters"})
PHONEMIZER_KEYS = ("language", "preserve_punctuation", "with_stress")
FITTED = "mel_rvq"  # the codec that is fitted on the corpus, so its file defines the codes
_NOT_SET = "(not set)"


def default_codec_checkpoint(h5_path: Path) -> Path:
    """Where ``prepare`` fits the mel_rvq codec by default: beside the data file."""
    return h5_path.with_name(h5_path.stem + "_mel_rvq.safetensors")


def codec_checkpoint(opts: PrepareOptions, h5_path: Path) -> Path | None:
    """The fitted codec file the options point at (``codec_checkpoint``, else
    ``codec_options.checkpoint``, else beside the data file); None for other codecs."""
    if opts.codec != FITTED:
        return None
    given = opts.codec_checkpoint or opts.codec_options.get("checkpoint")
    return Path(given).expanduser() if given else default_codec_checkpoint(h5_path)


def requested(opts: PrepareOptions, h5_path: Path, defaults: bool = True) -> dict[str, Any]:
    """The options that shape the file's content, flat and keyed as in ``prepare:``:
    ``codec``, ``codec_options.<key>`` (with the codec's defaults unless ``defaults`` is
    false; file locations left out), ``codec_checkpoint`` (mel_rvq: sha256 of the file, None
    when it does not exist yet) and the phonemizer options."""
    record: dict[str, Any] = {"codec": opts.codec}
    options = dict(_codec_defaults(opts.codec)) if defaults else {}
    options.update(opts.codec_options)
    for key, value in options.items():
        if not key.endswith("checkpoint") and key not in DECODE_ONLY:
            record[f"codec_options.{key}"] = _plain(value)
    checkpoint = codec_checkpoint(opts, h5_path)
    if checkpoint is not None:
        record["codec_checkpoint"] = file_sha256(checkpoint)
    for key in PHONEMIZER_KEYS:
        record[key] = getattr(opts, key)
    if opts.base_vocab is not None:  # recorded only when set: older files stay comparable
        record["base_vocab"] = hashlib.sha256(load_base_vocab(opts.base_vocab).encode()).hexdigest()
    return record


def load_base_vocab(path: Path) -> str:
    """The phoneme vocabulary JSON of ``prepare.base_vocab``: a network file's
    ``phoneme_vocab`` metadata, or a JSON file holding a vocabulary. Raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"base_vocab {path} does not exist; point it at the checkpoint to fine-tune"
        )
    if path.suffix == ".safetensors":
        try:
            meta = safetensors_metadata(path)
        except UserError as e:
            raise DataError(str(e)) from e
        if "phoneme_vocab" not in meta:
            raise DataError(
                f"base_vocab {path} has no phoneme_vocab metadata (not a VALL-E checkpoint "
                f"trained here); give a network file written by this trainer or a vocab JSON"
            )
        return meta["phoneme_vocab"]
    return path.read_text(encoding="utf-8")


def file_sha256(path: Path) -> str | None:
    """The file's sha256 (hex), or None when it does not exist."""
    return sha256_of_file(path) if path.is_file() else None


def check_matches(attrs: Any, opts: PrepareOptions, h5_path: Path) -> None:
    """Raise :class:`DataError` when the data file (its ``attrs``) was prepared with other
    codec or phonemizer options than ``opts``, listing each key's old and new value and how
    to rebuild the file."""
    now = requested(opts, h5_path)
    if RECORD_ATTR in attrs:
        before = json.loads(attrs[RECORD_ATTR])
        keys = list(dict.fromkeys([*before, *now]))
    else:  # written before the record: compare the options given with the stored configs
        before = _legacy_record(attrs, h5_path.parent)
        now = requested(opts, h5_path, defaults=False)
        keys = [k for k in now if k in before]
    changed = [k for k in keys if _plain(before.get(k, _NOT_SET)) != _plain(now.get(k, _NOT_SET))]
    if changed:
        lines = [
            _describe(k, before.get(k, _NOT_SET), now.get(k, _NOT_SET), opts, h5_path)
            for k in changed
        ]
        raise DataError(_mismatch_message(h5_path, lines, changed, opts))


def _mismatch_message(
    h5_path: Path, lines: list[str], changed: list[str], opts: PrepareOptions
) -> str:
    partial = h5_path.with_name(h5_path.name + ".partial")
    extra = ""
    fitted = codec_checkpoint(opts, h5_path)
    if fitted is not None and any(k.startswith("codec_options.") for k in changed):
        extra = f" and the fitted codec {fitted} (its stored options win over codec_options)"
    return (
        f"{h5_path} was prepared with other options than this `prepare:` section gives "
        f"(prepare.<key>: value in the file -> value now):\n"
        + "\n".join(f"  {line}" for line in lines)
        + "\nIts codes and phonemes were made with the old values. Either put those back, or "
        f"rebuild the data: delete or move {h5_path} (and {partial.name} if there is one)"
        f"{extra}, or point the dataset's `path` at a new file; then run "
        f"`python -m data.audio.prepare -opt <experiment.yml>` (training also prepares a "
        f"missing file)."
    )


def _describe(key: str, before: Any, now: Any, opts: PrepareOptions, h5_path: Path) -> str:
    if key != "codec_checkpoint" or opts.codec != FITTED:
        return f"{key}: {_show(before)} -> {_show(now)}"
    path = codec_checkpoint(opts, h5_path)
    if now is None:
        return f"codec_checkpoint: {path} does not exist (the file's codes were made with it)"
    return (
        f"codec_checkpoint: {path} holds another fitted codec than the one the file was "
        f"encoded with (sha256 {str(before)[:12]}... -> {str(now)[:12]}...)"
    )


def _show(value: Any) -> str:
    return value if value is _NOT_SET else repr(value)


def _legacy_record(attrs: Any, folder: Path) -> dict[str, Any]:
    """A record from the codec and phonemizer configs of a file written before the record."""
    codec = resolve_codec_config(json.loads(attrs["codec"]), folder)
    phonemizer = json.loads(attrs["phonemizer"])
    record: dict[str, Any] = {"codec": codec.get("name")}
    for key, value in codec.items():
        if key != "name" and not key.endswith("checkpoint") and key not in DECODE_ONLY:
            record[f"codec_options.{key}"] = value
    record.update({k: phonemizer[k] for k in PHONEMIZER_KEYS if k in phonemizer})
    stored = Path(codec["checkpoint"]) if codec.get("checkpoint") else None
    if stored is not None and stored.is_file():  # else unknown: moved without its codec
        record["codec_checkpoint"] = file_sha256(stored)
    return record


def _codec_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of a registered codec's constructor ({} for an unknown name)."""
    if name not in CODECS.names():
        return {}
    params = inspect.signature(CODECS.get(name)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(value, default=str))


def record_for_file(opts: PrepareOptions, h5_path: Path) -> str:
    """The ``prepare_options`` attribute to write into a new data file."""
    return json.dumps(requested(opts, h5_path), sort_keys=True)


# ------------------------------------------------------------------------- codec configs
def portable_codec_config(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A codec config to store in a data file of ``folder``: its checkpoint relative to it."""
    out = dict(config)
    if out.get("checkpoint"):
        out["checkpoint"] = Path(
            os.path.relpath(Path(out["checkpoint"]).resolve(), folder.resolve())
        ).as_posix()
    return out


def resolve_codec_config(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A stored codec config with its checkpoint resolved against the data file's ``folder``.
    Older files hold an absolute path: it is kept, unless it is gone and a file of that name
    lies beside the data file (the data folder was moved)."""
    out = dict(config)
    if out.get("checkpoint"):
        stored = Path(out["checkpoint"]).expanduser()
        path = (folder / stored).resolve()
        if stored.is_absolute() and not path.is_file() and (folder / stored.name).is_file():
            path = (folder / stored.name).resolve()
        out["checkpoint"] = str(path)
    return out
