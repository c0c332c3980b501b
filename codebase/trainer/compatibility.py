"""Does a pretrained network speak the same language as this run's data?

A network file written by this trainer records what its inputs and outputs meant when it was
trained: the phoneme vocabulary, phonemizer and codec of its data (VALL-E), or the BPE
tokenizer, mel features and DVAE (Tortoise's GPT). Fine-tuning it on data prepared otherwise
fails silently: phoneme ids shuffled by a new sorted vocabulary, codes of another codec. So
before the first step every ``path.pretrain_model_<net>`` file is compared with what the
run's data and injectors provide (:attr:`ExtensibleTrainer.checkpoint_metadata`), and a
difference is an error naming it and the way out.

A phoneme vocabulary that *extends* the checkpoint's (same ids, new symbols at the end, what
``prepare: {base_vocab: <checkpoint>}`` makes) is compatible: the network's tables grow with
``path.grow_embeddings``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data.audio.phonemes import PhonemeVocab
from utils.io import file_sha256, safetensors_metadata
from utils.schema import ConfigError

log = logging.getLogger(__name__)

# metadata key -> what it is, in messages
CHECKED = {
    "phoneme_vocab": "phoneme vocabulary",
    "phonemizer": "phonemizer settings",
    "codec": "codec",
    "text_tokenizer": "text tokenizer",
    "mel_spectrogram": "mel features",
    "dvae": "DVAE",
}


def check_pretrained(
    pretrain: dict[str, Path], current: dict[str, str], file: str | None = None
) -> None:
    """Raise ConfigError (at ``path.pretrain_model_<net>``) for each pretrained network file
    whose recorded data description differs from ``current``; files without one (a ``.pth``,
    another tool's) are logged and passed."""
    problems = []
    for net, path in pretrain.items():
        path = Path(path)
        if path.suffix != ".safetensors":
            log.info("%s: no data description to compare (%s)", path, path.suffix)
            continue
        saved = safetensors_metadata(path)
        lines = differences(saved, current)
        if lines:
            problems.append(
                (
                    f"path.pretrain_model_{net}",
                    f"{path} was trained on data described otherwise than this run's:\n"
                    + "\n".join(f"  - {line}" for line in lines),
                )
            )
    if problems:
        raise ConfigError(problems, file)


def differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per described part (see :data:`CHECKED`) that differs, with the way out."""
    lines = []
    for key, what in CHECKED.items():
        if key not in saved or key not in current or saved[key] == current[key]:
            continue
        try:
            line = _compare(key, saved[key], current[key])
        except (ValueError, TypeError, KeyError) as e:
            line = f"unreadable {what} in the checkpoint ({e})"
        if line:
            lines.append(f"{what}: {line}")
    return lines


def _compare(key: str, saved: str, current: str) -> str | None:
    if key == "phoneme_vocab":
        return _compare_vocab(PhonemeVocab.from_json(saved), PhonemeVocab.from_json(current))
    a, b = json.loads(saved), json.loads(current)
    if key == "text_tokenizer":
        changed = [k for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)]
        if not changed:
            return None
        return (
            f"{', '.join(changed)} differ (checkpoint {a.get('name')!r}, data "
            f"{b.get('name')!r}); use the checkpoint's vocabulary and cleaners "
            f"(tokenizer_vocab, text_cleaners)"
        )
    changed = _dict_changes(a, b)
    fix = {
        "phonemizer": "prepare the data with the checkpoint's phonemizer options",
        "codec": "prepare the data with the checkpoint's codec and codec_options",
        "mel_spectrogram": "use the checkpoint's torch_mel_spectrogram options and mel_norm_file",
        "dvae": "point discrete_token at the DVAE the checkpoint was trained with",
    }[key]
    return f"{'; '.join(changed)}; {fix}" if changed else None


def _dict_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: checkpoint -> data`` per differing key; files named by path are compared by
    content (a copied file is the same file)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "(not set)"), b.get(k, "(not set)")
        if x == y:
            continue
        if (k.endswith("checkpoint") or k == "weights") and _same_file(x, y):
            continue
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y) > 8:
            out.append(f"{k}: {sum(p != q for p, q in zip(x, y))} of {len(x)} values differ")
            continue
        out.append(f"{k}: {x!r} -> {y!r}")
    return out


def _same_file(a: Any, b: Any) -> bool:
    try:
        pa, pb = Path(str(a)), Path(str(b))
        return pa.is_file() and pb.is_file() and file_sha256(pa) == file_sha256(pb)
    except OSError:
        return False


def _compare_vocab(saved: PhonemeVocab, data: PhonemeVocab) -> str | None:
    old, new = saved.id_to_symbol, data.id_to_symbol
    if new[: len(old)] == old:
        if len(new) > len(old):
            log.info(
                "the data's phoneme vocabulary extends the checkpoint's by %d symbols (ids kept)",
                len(new) - len(old),
            )
        return None
    moved = [s for i, s in enumerate(old) if s in data.symbol_to_id and data.symbol_to_id[s] != i]
    missing = [s for s in old if s not in data.symbol_to_id]
    added = [s for s in new if s not in saved.symbol_to_id]
    parts = []
    if moved:
        parts.append(f"{len(moved)} symbols have other ids (e.g. {moved[:5]})")
    if missing:
        parts.append(f"{len(missing)} of the checkpoint's symbols are not in the data's list")
    if added:
        parts.append(f"{len(added)} new symbols (e.g. {added[:5]})")
    return (
        f"{', '.join(parts)}. Prepare the data from the checkpoint's vocabulary (existing ids "
        f"kept, new symbols appended): datasets.<phase>.prepare.base_vocab: <this checkpoint>, "
        f"and if it grew, raise the network's n_phonemes and set path.grow_embeddings: true"
    )
