"""BPE text tokenizer with DLAS/Tortoise behaviour, and a command that trains one on a corpus.

A vocabulary is a Hugging Face ``tokenizers`` JSON file whose first tokens are ``[STOP]`` (0),
``[UNK]`` (1) and ``[SPACE]`` (2). Encoding cleans the text (:mod:`data.audio.text_cleaners`),
replaces every space by ``[SPACE]`` and runs the BPE model; characters outside the vocabulary
become ``[UNK]``. The default vocabulary is Tortoise's (255 tokens, lowercase English), shipped
next to this file. For another language, train one on the corpus:

    python -m data.audio.bpe_tokenizer train -opt ../experiments/x.yml [--phase train] \\
        --vocab-size 256 --out my_tokenizer.json
    python -m data.audio.bpe_tokenizer train --filelist train.txt --cleaners basic --out tok.json
    python -m data.audio.bpe_tokenizer encode [--vocab tok.json] "Some text."
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from data.audio.bpe_tokenizer import main
    from utils.errors import run_command

    sys.exit(run_command(main))

import argparse
import logging
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data.audio.text_cleaners import CLEANERS, Cleaners, map_punctuation
from utils.errors import UserError
from utils.options import add_debug_flag, load_options

STOP_ID = 0  # [STOP]: start/end of text in Tortoise's GPT; never inside a transcript
UNK_ID = 1  # [UNK]: a character the vocabulary lacks; such items are not trained on
SPACE_TOKEN = "[SPACE]"
SPECIAL_TOKENS = ("[STOP]", "[UNK]", SPACE_TOKEN)  # ids 0, 1, 2 in this order
TORTOISE_VOCAB = Path(__file__).with_name("tortoise_tokenizer.json")


class VocabError(UserError, ValueError):
    """A vocabulary file that is missing, not a tokenizers JSON, or lacks the special tokens."""


class BpeTokenizer:
    """Clean, encode and decode text with a BPE vocabulary (DLAS ``VoiceBpeTokenizer``).

    Args:
        vocab: a ``tokenizers`` JSON file (None: Tortoise's vocabulary).
        cleaners: ``english`` (Tortoise's vocabulary was trained on this) or ``basic``
            (lowercase only; keeps non-Latin scripts).
        dlas_punctuation: apply DLAS's punctuation mapping after cleaning (brackets -> ``()``,
            backtick -> ``'``, a lone symbol -> empty); False reproduces tortoise-tts, which
            encodes those characters as [UNK].
    """

    def __init__(
        self,
        vocab: Path | str | None = None,
        cleaners: Cleaners = "english",
        dlas_punctuation: bool = True,
    ) -> None:
        self.vocab = Path(vocab) if vocab is not None else TORTOISE_VOCAB
        if cleaners not in CLEANERS:
            raise ValueError(f"cleaners must be one of {sorted(CLEANERS)}, got {cleaners!r}")
        self.cleaners, self.dlas_punctuation = cleaners, dlas_punctuation
        self.tokenizer = load_vocab(self.vocab)

    def config(self) -> dict:
        """Everything this tokenizer is (the vocabulary JSON itself included), for a
        checkpoint to carry; :meth:`from_config` rebuilds it."""
        return {
            "vocab": self.tokenizer.to_str(),
            "name": self.vocab.name,
            "cleaners": self.cleaners,
            "dlas_punctuation": self.dlas_punctuation,
        }

    @classmethod
    def from_config(cls, config: dict) -> BpeTokenizer:
        """The tokenizer :meth:`config` describes."""
        if config.get("cleaners") not in CLEANERS:
            raise VocabError(f"tokenizer config: unknown cleaners {config.get('cleaners')!r}")
        tok = cls.__new__(cls)
        tok.vocab = Path(config.get("name") or "checkpoint vocabulary")
        tok.cleaners = config["cleaners"]
        tok.dlas_punctuation = bool(config.get("dlas_punctuation", True))
        try:
            tok.tokenizer = Tokenizer.from_str(config["vocab"])
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise VocabError(f"tokenizer config: the vocabulary is not tokenizers JSON: {e}") from e
        return tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the text embedding needs at least this many rows)."""
        return self.tokenizer.get_vocab_size()

    def clean(self, text: str) -> str:
        """The text as it is encoded (spaces still plain spaces)."""
        text = CLEANERS[self.cleaners](text)
        return map_punctuation(text) if self.dlas_punctuation else text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after cleaning; no [STOP] is added."""
        return self.encode_cleaned(self.clean(text))

    def encode_cleaned(self, cleaned: str) -> list[int]:
        """Token ids of already cleaned text."""
        return self.tokenizer.encode(cleaned.replace(" ", SPACE_TOKEN)).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; [STOP] and [UNK] are dropped, [SPACE] is a space."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        text = text.replace(" ", "").replace(SPACE_TOKEN, " ")
        return text.replace("[STOP]", "").replace("[UNK]", "")

    def problem(self, text: str, max_tokens: int | None = None) -> str | None:
        """Why ``text`` cannot be trained on with this vocabulary, or None: nothing left after
        cleaning, characters the vocabulary lacks ([UNK]), or more than ``max_tokens``."""
        cleaned = self.clean(text)
        if not cleaned.strip():
            return f"empty text after cleaning: {text!r}"
        ids = self.encode_cleaned(cleaned)
        if UNK_ID in ids:
            vocab = self.tokenizer.get_vocab()
            missing = sorted({ch for ch in cleaned if ch != " " and ch not in vocab})
            return (
                f"unknown characters: {''.join(missing) or '?'!r} in {cleaned!r} are not in "
                f"{self.vocab.name} (train a vocabulary for this corpus: python -m "
                f"data.audio.bpe_tokenizer train)"
            )
        if max_tokens is not None and len(ids) > max_tokens:
            return f"too long (text): {len(ids)} > max_text_length {max_tokens} tokens"
        return None


def load_vocab(path: Path) -> Tokenizer:
    """A ``tokenizers`` vocabulary whose ids 0, 1, 2 are [STOP], [UNK], [SPACE]."""
    if not path.is_file():
        raise VocabError(f"tokenizer vocabulary {path} does not exist; check tokenizer_vocab")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise VocabError(f"{path} is not a tokenizers JSON vocabulary: {e}") from e
    got = [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
    if got != list(SPECIAL_TOKENS):
        raise VocabError(
            f"{path}: ids 0, 1, 2 must be {', '.join(SPECIAL_TOKENS)}, got {got} (train the "
            f"vocabulary with python -m data.audio.bpe_tokenizer train)"
        )
    return tok


def train_vocab(texts: Iterable[str], vocab_size: int, cleaners: Cleaners = "english") -> Tokenizer:
    """A BPE vocabulary like Tortoise's (Whitespace pre-tokenizer, [STOP], [UNK], [SPACE]
    first) trained on ``texts`` cleaned as :class:`BpeTokenizer` will clean them."""
    clean = CLEANERS[cleaners]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator((map_punctuation(clean(t)) for t in texts), trainer=trainer)
    return tok


# ---------------------------------------------------------------------------------- the CLI
def corpus_texts(opt: dict, phase: str) -> tuple[list[str], Cleaners]:
    """Transcripts of ``datasets.<phase>`` (read as the dataset reads them, without the audio
    screening) and its ``text_cleaners``. The tokenizer options are left out: the vocabulary
    being trained does not exist yet."""
    from data.audio.corpus import split_fraction
    from data.audio.fetchers import fetch
    from data.spec import require_phase, validate_datasets

    section = (opt.get("datasets") or {}).get(phase)
    if isinstance(section, dict):
        for key in ("use_bpe_tokenizer", "tokenizer_vocab"):
            section.pop(key, None)
    spec = require_phase(validate_datasets(opt), phase, opt.get("_file"))
    kw = spec.kwargs
    if "path" not in kw:
        raise UserError(f"datasets.{phase} ({spec.mode}) has no `path` to read transcripts from")
    items, _ = fetch(kw.get("fetcher_mode", "lj"), kw["path"])
    fraction = kw.get("val_fraction", 0.0)
    if fraction:
        want_val = (spec.phase or phase) == "val"
        items = [u for u in items if (split_fraction(u.id) < fraction) == want_val]
    return [u.text for u in items], kw.get("text_cleaners", "english")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a BPE vocabulary on a corpus's transcripts")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("-opt", "--opt", help="experiment YAML: read datasets.<phase>")
    source.add_argument("--filelist", type=Path, nargs="+", help="corpus path(s) instead")
    t.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--phase", default="train", help="which datasets.<phase> (with -opt)")
    t.add_argument("--fetcher-mode", default="lj", help="how to read --filelist (lj, tsv ...)")
    t.add_argument(
        "--cleaners",
        choices=sorted(CLEANERS),
        default=None,
        help="text cleaning (default: the dataset's text_cleaners, else english)",
    )
    t.add_argument("--vocab-size", type=int, default=256, help="tokens in the vocabulary")
    t.add_argument("--out", type=Path, required=True, help="vocabulary JSON to write")
    e = sub.add_parser("encode", help="print the cleaned text and token ids of texts")
    e.add_argument("text", nargs="+")
    e.add_argument("--vocab", type=Path, default=None, help="default: Tortoise's vocabulary")
    e.add_argument("--cleaners", choices=sorted(CLEANERS), default="english")
    for sp in (t, e):
        add_debug_flag(sp)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "encode":
        tok = BpeTokenizer(args.vocab, args.cleaners)
        for text in args.text:
            ids = tok.encode(text)
            print(f"{tok.clean(text)!r} -> {ids}" + ("  [UNK]" if UNK_ID in ids else ""))
        return 0
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    if args.vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size must be > {len(SPECIAL_TOKENS)}, got {args.vocab_size}")
    if args.opt:
        texts, cleaners = corpus_texts(load_options(args.opt, args.override), args.phase)
    else:
        from data.audio.fetchers import fetch

        items, skipped = fetch(args.fetcher_mode, list(args.filelist))
        for where, reason in skipped:
            print(f"skipped {where}: {reason}")
        texts, cleaners = [u.text for u in items], "english"
    cleaners = args.cleaners or cleaners
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no transcripts found to train on; check the corpus path")
    vocab = train_vocab(texts, args.vocab_size, cleaners)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(str(args.out))
    tok = BpeTokenizer(args.out, cleaners)
    lengths = [len(tok.encode(t)) for t in texts]
    unknown = sum(1 for t in texts if UNK_ID in tok.encode(t))
    print(
        f"wrote {args.out}: {tok.vocab_size} tokens ({cleaners} cleaners) from {len(texts)} "
        f"transcripts; {sum(lengths) / len(lengths):.1f} tokens per transcript on average, "
        f"at most {max(lengths)}; {unknown} transcript(s) with [UNK]"
    )
    print(f"use it with: use_bpe_tokenizer: true, tokenizer_vocab: {args.out}")
    if cleaners != "english":
        print(f"and text_cleaners: {cleaners}")
    return 0
