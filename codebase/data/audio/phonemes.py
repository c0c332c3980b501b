"""Text -> IPA phoneme symbols (espeak-ng through phonemizer) and the symbol <-> id vocabulary.

The same :class:`Phonemizer` and :class:`PhonemeVocab` serve data preparation and the
``phonemize`` injector, so ids written into ``data.h5`` match the ones made at training time.
espeak-ng comes from the pip package ``espeakng-loader`` (library and data bundled), so no
system espeak is needed; ``PHONEMIZER_ESPEAK_LIBRARY`` picks another library, as in phonemizer.

Check from ``codebase/``: ``python -m data.audio.phonemes "Some text" --stress``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils.errors import DataError, UserError, run_command
from utils.options import add_debug_flag
from utils.registry import did_you_mean

log = logging.getLogger(__name__)
# phonemizer warns on every call whose text switches language ("(en)" flags removed): per
# batch that floods a training log, so its backend gets a logger that shows errors only.
_espeak_log = log.getChild("espeak")
_espeak_log.setLevel(logging.ERROR)

STRESS_MARKS = "ˈˌ"  # primary, secondary: split off as symbols of their own
WORD_BOUNDARY = " "
_PHONE_SEP = "|"  # not a punctuation mark nor an IPA character, so splitting on it is exact
_configured: tuple[str, str | None] | None = None  # (library, data path) given to phonemizer


class EspeakUnavailable(UserError, RuntimeError):
    """No working espeak-ng library: the message says what to install or set."""


class UnknownLanguage(UserError, ValueError):
    """An espeak language code that does not exist (the message lists the closest ones)."""


class UnreadableVocab(DataError, ValueError):
    """A phoneme vocab file that is not a vocab this code reads."""


def espeak_library() -> str:
    """Path of the espeak-ng shared library, configured into phonemizer on first use.

    ``PHONEMIZER_ESPEAK_LIBRARY`` wins when set (its data is found by espeak itself, or from
    ``PHONEMIZER_ESPEAK_DATA_PATH``/``ESPEAK_DATA_PATH``); otherwise the library and data
    bundled by ``espeakng-loader`` are used.
    """
    global _configured
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    data: str | None = None
    env_lib = os.environ.get("PHONEMIZER_ESPEAK_LIBRARY")
    if env_lib:
        if not (Path(env_lib).is_file() and os.access(env_lib, os.R_OK)):
            raise EspeakUnavailable(
                f"PHONEMIZER_ESPEAK_LIBRARY={env_lib} is not a readable file; "
                "point it at libespeak-ng.so, or unset it to use the library "
                "bundled by `pip install espeakng-loader`"
            )
        library = env_lib
    else:
        try:
            import espeakng_loader
        except ImportError as e:
            raise EspeakUnavailable(
                "no espeak-ng library: `pip install espeakng-loader` (bundles "
                "espeak-ng), or set PHONEMIZER_ESPEAK_LIBRARY to a "
                "libespeak-ng shared library"
            ) from e
        library = espeakng_loader.get_library_path()
        if not Path(library).is_file():
            raise EspeakUnavailable(
                f"espeakng-loader's library {library} is missing; reinstall it "
                "(`pip install --force-reinstall espeakng-loader`) or set "
                "PHONEMIZER_ESPEAK_LIBRARY"
            )
        # The bundled library has no compiled-in data folder: hand it the bundled one unless
        # the user points espeak somewhere else (phonemizer reads PHONEMIZER_ESPEAK_DATA_PATH
        # itself; espeak reads ESPEAK_DATA_PATH when given no path).
        if not ("PHONEMIZER_ESPEAK_DATA_PATH" in os.environ or "ESPEAK_DATA_PATH" in os.environ):
            data = espeakng_loader.get_data_path()
    if _configured != (library, data):
        EspeakWrapper.set_library(library)
        EspeakWrapper.set_data_path(data)
        _configured = (library, data)
    return library


def supported_languages() -> dict[str, str]:
    """espeak language code -> name, e.g. ``{"en-us": "english-us", ...}``."""
    espeak_library()
    from phonemizer.backend import EspeakBackend

    return dict(EspeakBackend.supported_languages())


def split_symbols(phonemized: str, punctuation_marks: str) -> list[str]:
    """Split phonemizer output (phones joined by ``|``, words by spaces) into symbols.

    Punctuation marks and stress marks, which phonemizer glues to the neighbouring phone,
    become symbols of their own; runs of word boundaries collapse to one.
    """
    symbols: list[str] = []
    for word in phonemized.split(WORD_BOUNDARY):
        if not word:
            continue
        if symbols and symbols[-1] != WORD_BOUNDARY:
            symbols.append(WORD_BOUNDARY)
        for token in word.split(_PHONE_SEP):
            phone = ""
            for ch in token:
                if ch in punctuation_marks or ch in STRESS_MARKS:
                    if phone:
                        symbols.append(phone)
                        phone = ""
                    symbols.append(ch)
                elif not ch.isspace():
                    phone += ch
            if phone:
                symbols.append(phone)
    while symbols and symbols[-1] == WORD_BOUNDARY:
        symbols.pop()
    return symbols


# The scripts whose letters espeak reads as words of a language (by base code); Latin is
# allowed everywhere because espeak switches to English for Latin-script words. A letter of a
# script listed here but not for the language is read out by its name ("Chinese letter") or
# spelled, which is not speech in that language. Languages not listed are not checked.
_LANGUAGES_BY_SCRIPTS: dict[tuple[str, ...], str] = {
    (): "af an az bs ca cs cy da de en eo es et eu fi fr ga gd hr ht hu ia id is it la lt lv "
    "mi ms mt nb nl no pl pt qu ro sk sl sq sv sw tn tr uz vi",
    ("CYRILLIC",): "ru uk be bg mk kk ky tt ba cv",
    ("GREEK",): "el grc",
    ("ARABIC",): "ar fa ur ps sd",
    ("HEBREW",): "he",
    ("DEVANAGARI",): "hi mr ne sa",
    ("CJK",): "cmn yue hak zh",
    ("CJK", "HIRAGANA", "KATAKANA"): "ja",
    ("HANGUL",): "ko",
    ("THAI",): "th",
    ("GEORGIAN",): "ka",
    ("ARMENIAN",): "hy hyw",
    ("BENGALI",): "bn as",
    ("TAMIL",): "ta",
    ("TELUGU",): "te",
    ("KANNADA",): "kn",
    ("MALAYALAM",): "ml",
    ("GUJARATI",): "gu",
    ("GURMUKHI",): "pa",
    ("SINHALA",): "si",
    ("ETHIOPIC",): "am",
    ("MYANMAR",): "my",
}
_SCRIPTS = {c: scripts for scripts, codes in _LANGUAGES_BY_SCRIPTS.items() for c in codes.split()}
_KNOWN_SCRIPTS = {"LATIN"}.union(*_LANGUAGES_BY_SCRIPTS)


def _script(ch: str) -> str | None:
    """The script of a letter as unicodedata names it (``LATIN``, ``CJK``, ``KATAKANA`` ...)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    word = unicodedata.name(ch, "").split(" ", 1)[0]
    return next((s for s in _KNOWN_SCRIPTS if word == s or word.startswith(s + "-")), None)


def foreign_characters(text: str, language: str) -> list[str]:
    """The distinct letters of ``text`` (in order) from a script that the espeak ``language``
    does not read as its own, e.g. Chinese characters for ``en-us``, which espeak speaks as
    "Chinese letter". Empty for languages whose scripts are not known here."""
    allowed = _SCRIPTS.get(language.lower().split("-")[0])
    if allowed is None:
        return []
    found: dict[str, None] = {}
    for ch in text:
        script = _script(ch)
        if script is not None and script != "LATIN" and script not in allowed:
            found[ch] = None
    return list(found)


class Phonemizer:
    """Texts -> IPA with phonemizer's espeak backend (built once, reused for every call).

    Args:
        language: espeak language code (``en-us``, ``fr-fr`` ...; see ``--list-languages``).
        preserve_punctuation: keep ``;:,.!?`` ... as symbols (they carry prosody).
        with_stress: keep primary/secondary stress marks as symbols.
        punctuation_marks: the marks to keep; None = phonemizer's default set.
        njobs: processes phonemizer uses for one call (worth it only for big batches).
    """

    def __init__(
        self,
        language: str = "en-us",
        preserve_punctuation: bool = True,
        with_stress: bool = False,
        punctuation_marks: str | None = None,
        njobs: int = 1,
    ) -> None:
        from phonemizer.punctuation import Punctuation

        if njobs < 1:
            raise ValueError(f"Phonemizer: njobs must be >= 1, got {njobs}")
        self.language = language
        self.preserve_punctuation = preserve_punctuation
        self.with_stress = with_stress
        self.punctuation_marks = (
            Punctuation.default_marks() if punctuation_marks is None else punctuation_marks
        )
        self.njobs = njobs
        self._backend: Any = None
        self._make_backend()  # now, so that a bad language fails at construction

    def _make_backend(self) -> Any:
        espeak_library()
        from phonemizer.backend import EspeakBackend

        try:
            self._backend = EspeakBackend(
                self.language,
                punctuation_marks=self.punctuation_marks,
                preserve_punctuation=self.preserve_punctuation,
                with_stress=self.with_stress,
                # espeak marks foreign words with "(en)" flags: they are not phones
                language_switch="remove-flags",
                logger=_espeak_log,
            )
        except RuntimeError as e:
            if "not supported" not in str(e):
                raise EspeakUnavailable(
                    f"espeak-ng failed to start ({e}); set "
                    "PHONEMIZER_ESPEAK_LIBRARY to a working libespeak-ng"
                ) from e
            raise UnknownLanguage(
                f"unknown espeak language {self.language!r}"
                f"{did_you_mean(self.language, supported_languages())}; list the supported ones "
                "with `python -m data.audio.phonemes --list-languages` (from codebase/)"
            ) from e
        return self._backend

    def __getstate__(self) -> dict:
        # The backend holds a ctypes handle: rebuild it in the receiving process instead.
        return {**self.__dict__, "_backend": None}

    def config(self) -> dict[str, Any]:
        """The options that rebuild this phonemizer (saved next to the vocab)."""
        return {
            "language": self.language,
            "preserve_punctuation": self.preserve_punctuation,
            "with_stress": self.with_stress,
            "punctuation_marks": self.punctuation_marks,
            "njobs": self.njobs,
        }

    def phonemize_symbols(self, texts: Sequence[str]) -> list[list[str]]:
        """One symbol list per text: phones, ``" "`` between words, punctuation and (with
        ``with_stress``) stress marks as their own symbols. Blank text -> ``[]``."""
        if isinstance(texts, str):
            raise TypeError(
                "phonemize_symbols takes a list of texts; wrap a single text in a "
                "list: phonemize_symbols([text])"
            )
        from phonemizer.separator import Separator

        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(
                f"phonemize_symbols: text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a str"
            )
        # phonemizer reads one text per line and misaligns punctuation around empty lines, so
        # whitespace (newlines included) is normalised and blank texts never reach it.
        clean = [" ".join(t.split()) for t in texts]
        todo = [i for i, t in enumerate(clean) if t]
        out: list[list[str]] = [[] for _ in clean]
        if not todo:
            return out
        backend = self._backend or self._make_backend()
        phonemized = backend.phonemize(
            [clean[i] for i in todo],
            strip=True,
            njobs=self.njobs,
            separator=Separator(phone=_PHONE_SEP, word=WORD_BOUNDARY, syllable=None),
        )
        if len(phonemized) != len(todo):  # never expected; a silent shift would mislabel data
            raise RuntimeError(
                f"phonemizer returned {len(phonemized)} results for {len(todo)} texts"
            )
        for i, p in zip(todo, phonemized):
            out[i] = split_symbols(p, self.punctuation_marks)
        return out

    def __call__(self, texts: str | Sequence[str]) -> str | list[str]:
        """IPA strings (symbols joined): one string for a str, a list for a list."""
        if isinstance(texts, str):
            return "".join(self.phonemize_symbols([texts])[0])
        return ["".join(s) for s in self.phonemize_symbols(texts)]


class PhonemeVocab:
    """Phoneme symbol <-> id map. Ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; the other
    symbols follow in the given order (:meth:`build` sorts them, so it is deterministic).

    Saved as JSON with the data (``data.h5`` attribute) and the model (safetensors metadata);
    the JSON round trip is exact.
    """

    PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)
    FORMAT = 1

    def __init__(self, symbols: Iterable[str]) -> None:
        self.id_to_symbol: list[str] = list(self.SPECIALS)
        for s in symbols:
            if not isinstance(s, str) or not s:
                raise ValueError(f"PhonemeVocab: symbols must be non-empty strings, got {s!r}")
            if s in self.SPECIALS:
                continue
            self.id_to_symbol.append(s)
        self.symbol_to_id: dict[str, int] = {s: i for i, s in enumerate(self.id_to_symbol)}
        if len(self.symbol_to_id) != len(self.id_to_symbol):
            dup = [s for s, n in Counter(self.id_to_symbol).items() if n > 1]
            raise ValueError(f"PhonemeVocab: duplicate symbols {dup}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.unknown_count = 0  # symbols encoded as <unk> so far
        self.unknown_symbols: Counter[str] = Counter()

    @classmethod
    def build(cls, symbol_lists: Iterable[Sequence[str]]) -> PhonemeVocab:
        """The vocab of every symbol seen in ``symbol_lists``, sorted."""
        seen: set[str] = set()
        for symbols in symbol_lists:
            seen.update(symbols)
        return cls(sorted(seen - set(cls.SPECIALS)))

    def extended(self, symbols: Iterable[str]) -> PhonemeVocab:
        """This vocab plus the new ``symbols`` appended (existing ids stay valid)."""
        new = sorted(set(symbols) - set(self.id_to_symbol))
        return PhonemeVocab(self.id_to_symbol[len(self.SPECIALS) :] + new)

    def __len__(self) -> int:
        return len(self.id_to_symbol)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.symbol_to_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PhonemeVocab) and self.id_to_symbol == other.id_to_symbol

    def __repr__(self) -> str:
        return f"PhonemeVocab({len(self)} symbols)"

    def encode(self, symbols: Sequence[str], add_bos_eos: bool = True) -> list[int]:
        """Ids of ``symbols`` (unknown ones -> ``<unk>``, counted), framed by ``<s>``/``</s>``."""
        ids = []
        for s in symbols:
            i = self.symbol_to_id.get(s)
            if i is None:
                self.unknown_count += 1
                self.unknown_symbols[s] += 1
                i = self.unk_id
            ids.append(i)
        return [self.bos_id, *ids, self.eos_id] if add_bos_eos else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Symbols of ``ids`` (ints or a 1-D tensor), without ``<pad>``, ``<s>``, ``</s>``.
        ``<unk>`` is kept so that lost symbols stay visible."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.id_to_symbol):
                raise IndexError(
                    f"phoneme id {i} is outside this vocab of {len(self)} symbols;"
                    " was the data prepared with another vocab?"
                )
            if i not in (self.pad_id, self.bos_id, self.eos_id):
                out.append(self.id_to_symbol[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "symbols": list(self.id_to_symbol)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhonemeVocab:
        if not isinstance(d, dict) or not isinstance(d.get("symbols"), list):
            raise ValueError("not a phoneme vocab: expected a dict with a 'symbols' list")
        if d.get("format", cls.FORMAT) != cls.FORMAT:
            raise ValueError(
                f"phoneme vocab format {d.get('format')} is not supported "
                f"(this code reads format {cls.FORMAT})"
            )
        symbols = d["symbols"]
        if tuple(symbols[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise ValueError(
                f"phoneme vocab must start with {list(cls.SPECIALS)}, got "
                f"{symbols[: len(cls.SPECIALS)]}"
            )
        return cls(symbols[len(cls.SPECIALS) :])

    def to_json(self) -> str:
        # ensure_ascii=False keeps IPA readable in h5 attributes and safetensors metadata
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PhonemeVocab:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"phoneme vocab is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        """Write the vocab as a JSON file (atomically: temp file then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> PhonemeVocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"phoneme vocab {path} not found; it is written by data "
                "preparation (or PhonemeVocab.save)"
            )
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UnreadableVocab(f"{path}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """Print the phoneme symbols of a text (and their ids with ``--vocab``)."""
    p = argparse.ArgumentParser(prog="python -m data.audio.phonemes", description=main.__doc__)
    p.add_argument("text", nargs="?", help="text to phonemize")
    p.add_argument("--language", default="en-us", help="espeak language code (default en-us)")
    p.add_argument("--stress", action="store_true", help="keep stress marks")
    p.add_argument("--no-punctuation", action="store_true", help="drop punctuation")
    p.add_argument("--vocab", type=Path, help="a PhonemeVocab JSON file: also print ids")
    p.add_argument("--list-languages", action="store_true", help="list espeak languages")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.list_languages:
        for code, name in sorted(supported_languages().items()):
            print(f"{code}\t{name}")
        return 0
    if args.text is None:
        p.error("give a text to phonemize, or --list-languages")
    # an unknown language or a missing espeak raises a UserError: run_command prints it
    ph = Phonemizer(
        args.language, preserve_punctuation=not args.no_punctuation, with_stress=args.stress
    )
    symbols = ph.phonemize_symbols([args.text])[0]
    print(ph(args.text))
    print(" ".join("␣" if s == WORD_BOUNDARY else s for s in symbols))
    if args.vocab:
        vocab = PhonemeVocab.load(args.vocab)
        print(vocab.encode(symbols))
        if vocab.unknown_symbols:
            print(f"not in the vocab: {dict(vocab.unknown_symbols)}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_command(main))
