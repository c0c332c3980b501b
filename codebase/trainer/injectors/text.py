"""Text injectors: ``phonemize`` turns a batch of texts into padded phoneme ids."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from data.audio.phonemes import PhonemeVocab, Phonemizer, supported_languages
from trainer.component import ComponentSpec, TrainerEnv
from trainer.injectors.base import Injector
from utils.registry import did_you_mean
from utils.schema import Problems, Runtime

log = logging.getLogger(__name__)


class PhonemizeInjector(Injector):
    """Texts (``in``: a list of strings) -> phoneme ids with ``<s>``/``</s>``.

    ``out``: one or two keys: ids as a LongTensor ``[B, L]`` padded with 0, then (optional)
    lengths as a LongTensor ``[B]``. Without ``vocab_file`` the first key holds the symbol
    lists instead (lengths then count symbols), which is handy for building a vocab.

    Args:
        language: espeak language code (``en-us``, ``fr-fr`` ...).
        preserve_punctuation: keep punctuation marks as symbols.
        with_stress: keep stress marks as symbols.
        vocab_file: a :class:`PhonemeVocab` JSON file, the one the data was prepared with.
        cache_size: texts whose ids are remembered (LRU); espeak takes about a millisecond
            per sentence, and an epoch repeats every text.
    """

    def __init__(
        self,
        env: Runtime[TrainerEnv],
        language: str = "en-us",
        preserve_punctuation: bool = True,
        with_stress: bool = False,
        vocab_file: Path | None = None,
        cache_size: int = 100_000,
    ) -> None:
        super().__init__()
        if cache_size < 0:
            raise ValueError(f"phonemize: cache_size must be >= 0, got {cache_size}")
        self.env = env
        self.phonemizer = Phonemizer(
            language, preserve_punctuation=preserve_punctuation, with_stress=with_stress
        )
        self.vocab = PhonemeVocab.load(vocab_file) if vocab_file is not None else None
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple] = OrderedDict()  # text -> ids or symbols
        self._warned: set[str] = set()

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path) -> dict:
        kwargs = super().check_options(options, path, problems, base_dir)
        # Checked here so that a typo is reported with every other problem, before building.
        language = kwargs.get("language")
        if language is not None:
            try:
                known = supported_languages()
            except RuntimeError as e:
                problems.add(f"{path}.language", str(e))
            else:
                if language not in known:
                    problems.add(
                        f"{path}.language",
                        f"unknown espeak language {language!r}"
                        f"{did_you_mean(language, known)}; list them with `python -m "
                        "data.audio.phonemes --list-languages` (from codebase/)",
                    )
        vocab_file = kwargs.get("vocab_file")
        if vocab_file is not None and not Path(vocab_file).is_file():
            problems.add(
                f"{path}.vocab_file",
                f"{vocab_file} not found; it is the phoneme vocab JSON written by data preparation",
            )
        return kwargs

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        if len(self.inputs) != 1:
            raise ValueError(
                f"phonemize: `in` must be one key (a list of texts), got {self.inputs}"
            )
        if len(self.outputs) not in (1, 2):
            raise ValueError(
                f"phonemize: `out` takes one or two keys (ids, then lengths), got {self.outputs}"
            )

    def encode(self, texts: list[str]) -> list[tuple]:
        """Ids (or symbols, without a vocab) of each text, phonemizing only cache misses."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh: dict[str, tuple] = {}
        if missing:
            for text, symbols in zip(missing, self.phonemizer.phonemize_symbols(missing)):
                fresh[text] = tuple(self.vocab.encode(symbols) if self.vocab else symbols)
            if self.vocab is not None:
                self._warn_unknown()
        out = []
        for t in texts:
            if t in fresh:
                out.append(fresh[t])
            else:
                self._cache.move_to_end(t)
                out.append(self._cache[t])
        for text, value in fresh.items():
            self._cache[text] = value
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def _warn_unknown(self) -> None:
        """Log each symbol missing from the vocab once: its ids silently become <unk>."""
        new = set(self.vocab.unknown_symbols) - self._warned
        if new:
            self._warned |= new
            log.warning(
                "phonemize: symbols %s are not in the phoneme vocab and are encoded as "
                "<unk>; was the vocab built with another language or options?",
                sorted(new),
            )

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        texts = state[self.input]
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(
                f"phonemize: state[{self.input!r}] must be a list of texts, got "
                f"{type(texts).__name__}"
            )
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(
                f"phonemize: state[{self.input!r}][{bad[0]}] is a "
                f"{type(texts[bad[0]]).__name__}, not a str"
            )
        encoded = self.encode(list(texts))
        device = self.env.device
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long, device=device)
        if self.vocab is None:
            first: Any = [list(e) for e in encoded]
        elif encoded:
            first = pad_sequence(
                [torch.tensor(e, dtype=torch.long) for e in encoded],
                batch_first=True,
                padding_value=self.vocab.pad_id,
            ).to(device)
        else:
            first = torch.zeros(0, 0, dtype=torch.long, device=device)
        result = {self.outputs[0]: first}
        if len(self.outputs) == 2:
            result[self.outputs[1]] = lengths
        return result
