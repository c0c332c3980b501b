"""Text cleaners applied before BPE tokenisation, with DLAS's behaviour (Tortoise's vocabulary
was trained on text cleaned this way, so the same cleaning must run before encoding).

``english`` (DLAS and Tortoise ``english_cleaners``): transliterate to
ASCII, lowercase, spell out numbers (inflect), expand 18 abbreviations (``dr.`` -> ``doctor``),
collapse whitespace runs to one space (not stripped), drop ``"``. ``basic`` keeps the script (for
a vocabulary trained on another language): lowercase, collapse whitespace, drop ``"``. After
either, DLAS (not Tortoise) runs :func:`map_punctuation`: brackets and backticks mapped, a text
that is a single symbol such as ``@`` emptied.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Literal

from unidecode import unidecode

Cleaners = Literal["english", "basic"]


@functools.cache
def _engine() -> Any:
    """inflect's engine, imported on first use: importing inflect takes seconds."""
    import inflect

    return inflect.engine()


# ------------------------------------------------------------------------------- numbers
_COMMA_NUMBER = re.compile(r"([0-9][0-9,]+[0-9])")
_DECIMAL = re.compile(r"([0-9]+\.[0-9]+)")
_POUNDS = re.compile(r"£([0-9,]*[0-9]+)")
_DOLLARS = re.compile(r"\$([0-9.,]*[0-9]+)")
_ORDINAL = re.compile(r"[0-9]+(st|nd|rd|th)")
_NUMBER = re.compile(r"[0-9]+")


def _dollars(m: re.Match) -> str:
    """``$3.50`` -> ``3 dollars, 50 cents`` (the digits are spelled out afterwards)."""
    amount = m.group(1)
    parts = amount.split(".")
    if len(parts) > 2:  # not a price (1.2.3): keep it and say "dollars"
        return f"{amount} dollars"
    dollars = int(parts[0]) if parts[0] else 0
    cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    d_unit = "dollar" if dollars == 1 else "dollars"
    c_unit = "cent" if cents == 1 else "cents"
    if dollars and cents:
        return f"{dollars} {d_unit}, {cents} {c_unit}"
    if dollars:
        return f"{dollars} {d_unit}"
    if cents:
        return f"{cents} {c_unit}"
    return "zero dollars"


def _cardinal(m: re.Match) -> str:
    """Years 1001..2999 are read in pairs (``nineteen eighty-four``, ``ten oh one``), except
    round hundreds (``nineteen hundred``) and 2000..2009 (``two thousand six``)."""
    n = int(m.group(0))
    if 1000 < n < 3000:
        if n == 2000:
            return "two thousand"
        if 2000 < n < 2010:
            return "two thousand " + _engine().number_to_words(n % 100)
        if n % 100 == 0:
            return _engine().number_to_words(n // 100) + " hundred"
        words = _engine().number_to_words(n, andword="", zero="oh", group=2)
        return words.replace(", ", " ")
    return _engine().number_to_words(n, andword="")


def expand_numbers(text: str) -> str:
    """Spell out numbers: thousands separators dropped, pounds, dollars and cents, decimals
    (``point``), ordinals (``103rd`` -> ``one hundred and third``) and cardinals."""
    text = _COMMA_NUMBER.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _POUNDS.sub(r"\1 pounds", text)
    text = _DOLLARS.sub(_dollars, text)
    text = _DECIMAL.sub(lambda m: m.group(1).replace(".", " point "), text)
    text = _ORDINAL.sub(lambda m: _engine().number_to_words(m.group(0)), text)
    return _NUMBER.sub(_cardinal, text)


# ------------------------------------------------------------------------- abbreviations
_ABBREVIATIONS = [
    (re.compile(rf"\b{short}\.", re.IGNORECASE), long)
    for short, long in [
        ("mrs", "misess"),
        ("mr", "mister"),
        ("dr", "doctor"),
        ("st", "saint"),
        ("co", "company"),
        ("jr", "junior"),
        ("maj", "major"),
        ("gen", "general"),
        ("drs", "doctors"),
        ("rev", "reverend"),
        ("lt", "lieutenant"),
        ("hon", "honorable"),
        ("sgt", "sergeant"),
        ("capt", "captain"),
        ("esq", "esquire"),
        ("ltd", "limited"),
        ("col", "colonel"),
        ("ft", "fort"),
    ]
]


def expand_abbreviations(text: str) -> str:
    """``dr.`` -> ``doctor``, ``st.`` -> ``saint`` ... (the dot is part of the abbreviation)."""
    for pattern, long in _ABBREVIATIONS:
        text = pattern.sub(long, text)
    return text


# --------------------------------------------------------------------------- punctuation
_PUNCTUATION_MAP = {"{": "(", "}": ")", "[": "(", "]": ")", "`": "'", "—": "-", "ʼ": "'"}
_PUNCTUATION = re.compile("|".join(re.escape(k) for k in _PUNCTUATION_MAP))
_LONE_SYMBOL = re.compile(r"^[@#%_=$^&*+\\]$")


def map_punctuation(text: str) -> str:
    """DLAS's ``remove_extraneous_punctuation``: brackets and braces become parentheses,
    backticks apostrophes, an em-dash a hyphen; a text that is one lone symbol (``@``, ``%``,
    ``$`` ...) becomes empty (it would only encode as [UNK])."""
    text = _PUNCTUATION.sub(lambda m: _PUNCTUATION_MAP[m.group(0)], text)
    return _LONE_SYMBOL.sub("", text)


# ------------------------------------------------------------------------------ cleaners
def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def english_cleaners(text: str) -> str:
    """ASCII, lowercase, numbers and abbreviations spelled out, whitespace collapsed, ``"``
    removed (DLAS and Tortoise ``english_cleaners``)."""
    text = expand_numbers(unidecode(text).lower())
    return _collapse(expand_abbreviations(text)).replace('"', "")


def basic_cleaners(text: str) -> str:
    """Lowercase, whitespace collapsed, ``"`` removed; the script and digits are kept (for
    languages other than English)."""
    return _collapse(text.lower()).replace('"', "")


CLEANERS: dict[str, Callable[[str], str]] = {"english": english_cleaners, "basic": basic_cleaners}
