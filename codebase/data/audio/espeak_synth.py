"""Offline speech synthesis with espeak-ng (ctypes on the library bundled by ``espeakng-loader``).

Used to build the demo corpus (:mod:`data.audio.demo_corpus`): robotic, but real, varied and
deterministic speech, made in milliseconds per sentence with no download.

espeak keeps all its state in C globals, so the library is loaded from a private copy (as
phonemizer's ``EspeakWrapper`` does with its own copy): the two instances never share voice,
rate or callback settings, and phonemizer keeps working in the same process. The instance is
a lazy per-process singleton, reloaded for every utterance so that output depends only on the
arguments (see ``_Espeak.reload``); it is NOT thread-safe: synthesize from one thread per
process (worker pools should use processes).

Check from ``codebase/``: ``python -m data.audio.espeak_synth "Hello there." --out /tmp/a.wav``.
"""

from __future__ import annotations

import _ctypes
import argparse
import ctypes
import functools
import shutil
import tempfile
import weakref
from multiprocessing import util as mp_util
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from utils.audio import save_audio
from utils.errors import UserError, run_command
from utils.options import add_debug_flag
from utils.registry import did_you_mean

# speak_lib.h constants (espeak-ng 1.5x; the values are part of its stable ABI).
AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesize in the calling thread
POS_CHARACTER = 1  # espeak_POSITION_TYPE
ESPEAK_CHARS_UTF8 = 1  # espeak_Synth flags
ESPEAK_RATE, ESPEAK_VOLUME, ESPEAK_PITCH, ESPEAK_RANGE, ESPEAK_WORDGAP = 1, 2, 3, 4, 7
EE_OK = 0
BUFFER_MS = 200  # callback chunk length; only affects how often the callback runs

# int callback(short *wav, int numsamples, espeak_EVENT *events); return 0 = go on.
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

RAND_SEED = 0
_libc = ctypes.CDLL(None)  # the process's C library, whose rand() espeak's noise uses
_libc.srand.argtypes = [ctypes.c_uint]

SILENCE_THRESHOLD = 1e-3  # |x| below this (about -60 dBFS) counts as silence when trimming
KEEP_SILENCE_S = 0.1  # silence kept at each end after trimming


class _Espeak:
    """This process's private copy of the library, reloaded fresh for every utterance."""

    def __init__(self) -> None:
        import espeakng_loader

        self.data = espeakng_loader.get_data_path()
        # dlopen returns the same handle for the same path: load a private copy so phonemizer's
        # instance (its own copy) and ours have separate global state. The copy lives until
        # the process exits (also a pool worker, which skips atexit: hence util.Finalize);
        # copying it afresh per reload instead would cost a third of the build's time.
        self.tmp = tempfile.mkdtemp(prefix="espeak_synth_")
        weakref.finalize(self, shutil.rmtree, self.tmp, True)
        mp_util.Finalize(self, shutil.rmtree, (self.tmp, True), exitpriority=0)
        self.path = Path(self.tmp) / Path(espeakng_loader.get_library_path()).name
        shutil.copy(espeakng_loader.get_library_path(), self.path)
        self.chunks: list[np.ndarray] = []
        # Keep a reference: ctypes would free the trampoline and espeak would call garbage.
        self._callback = _CALLBACK(self._collect)
        self.lib: ctypes.CDLL | None = None
        self.sample_rate = self.reload()

    def reload(self) -> int:
        """Unload and load the library again; returns its sample rate.

        espeak keeps synthesis state in C statics (the pitch-flutter phase, for one) that
        espeak_Initialize does not reset, so the same call gives different samples depending
        on what was spoken before. A fresh load (about 0.5 ms) makes every utterance depend
        only on its own arguments: same corpus whatever the order or the number of workers.
        """
        if self.lib is not None:
            self.lib.espeak_Terminate()
            _ctypes.dlclose(self.lib._handle)  # last reference: the next dlopen starts afresh
        self.lib = lib = ctypes.CDLL(str(self.path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        for fn in (
            "espeak_SetVoiceByName",
            "espeak_SetParameter",
            "espeak_Synth",
            "espeak_Synchronize",
            "espeak_Terminate",
        ):
            getattr(lib, fn).restype = ctypes.c_int
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, self.data.encode(), 0)
        if rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed (data folder {self.data}); reinstall espeakng-loader"
            )
        lib.espeak_SetSynthCallback(self._callback)
        # espeak_Initialize seeds the noise generators (breathy voices such as f2, f5) from
        # the clock: fix both seeds, or the same call gives different samples each second.
        # libc's srand is process-wide; nothing else in this process relies on rand().
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed(RAND_SEED)
        _libc.srand(RAND_SEED)
        return rate

    def _collect(self, wav, numsamples: int, events) -> int:
        if wav and numsamples > 0:  # a NULL wav with 0 samples marks the end of synthesis
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def check(self, code: int, what: str) -> None:
        if code != EE_OK:
            raise RuntimeError(f"espeak: {what} failed with code {code}")


class UnknownVoice(UserError, ValueError):
    """An espeak voice or variant name that does not exist."""


_instance: _Espeak | None = None


def _espeak() -> _Espeak:
    """This process's espeak (loaded and initialised on first use; see the module doc)."""
    global _instance
    if _instance is None:
        _instance = _Espeak()
    return _instance


@functools.lru_cache(maxsize=1)
def variants() -> frozenset[str]:
    """Voice variants bundled with espeak-ng (``m1``..``m8``, ``f1``..``f5``, ``klatt`` ...)."""
    import espeakng_loader

    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    return frozenset(f.name for f in folder.iterdir() if f.is_file())


def trim_silence(
    wav: torch.Tensor,
    sample_rate: int,
    threshold: float = SILENCE_THRESHOLD,
    keep_s: float = KEEP_SILENCE_S,
) -> torch.Tensor:
    """Cut leading/trailing samples with ``|x| < threshold`` down to ``keep_s`` each. [T]"""
    loud = torch.nonzero(wav.abs() >= threshold).flatten()
    if loud.numel() == 0:
        return wav[:0]
    keep = int(keep_s * sample_rate)
    start = max(0, int(loud[0]) - keep)
    end = min(wav.numel(), int(loud[-1]) + 1 + keep)
    return wav[start:end]


class EspeakSynth:
    """Text -> waveform with espeak-ng.

    Args:
        sample_rate_out: rate of the returned audio; espeak makes 22050 Hz and it is resampled.
    """

    def __init__(self, sample_rate_out: int = 16000) -> None:
        self.sample_rate_out = int(sample_rate_out)
        self.sample_rate_native = _espeak().sample_rate

    def synthesize(
        self,
        text: str,
        voice: str = "en-us",
        variant: str | None = None,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        word_gap: int = 0,
    ) -> torch.Tensor:
        """Speak ``text``; returns float32 [T] in [-1, 1] at ``sample_rate_out``.

        Args:
            voice: espeak voice/language name (``en-us``, ``en-gb``, ``fr-fr`` ...).
            variant: voice variant from ``espeak-ng-data/voices/!v`` (``m3``, ``f2``,
                ``klatt`` ...), or None for the voice's own.
            rate: speaking rate in words per minute (espeak accepts 80-450).
            pitch: base pitch, 0-100.
            pitch_range: intonation range, 0 (monotone) - 100.
            word_gap: extra pause between words, in units of 10 ms at the default rate.
        """
        es = _espeak()
        if variant is not None and variant not in variants():
            # espeak would silently speak the plain voice instead
            raise UnknownVoice(
                f"espeak variant {variant!r} does not exist"
                f"{did_you_mean(variant, variants())}; choose from "
                f"{', '.join(sorted(variants()))}"
            )
        es.reload()
        name = (f"{voice}+{variant}" if variant else voice).encode()
        if es.lib.espeak_SetVoiceByName(name) != EE_OK:
            raise UnknownVoice(
                f"espeak has no voice {voice!r}; list the voices (language codes) with "
                f"`python -m data.audio.phonemes --list-languages` (from codebase/)"
            )
        # After the voice: SetVoiceByName resets pitch and range to the variant's own.
        for param, value in (
            (ESPEAK_RATE, rate),
            (ESPEAK_VOLUME, 100),
            (ESPEAK_PITCH, pitch),
            (ESPEAK_RANGE, pitch_range),
            (ESPEAK_WORDGAP, word_gap),
        ):
            es.check(es.lib.espeak_SetParameter(param, int(value), 0), f"parameter {param}")
        data = text.encode("utf-8") + b"\0"
        es.chunks = []
        try:
            es.check(
                es.lib.espeak_Synth(
                    data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None
                ),
                f"synthesizing {text!r}",
            )
            es.check(es.lib.espeak_Synchronize(), "synchronize")
            pcm = np.concatenate(es.chunks) if es.chunks else np.zeros(0, np.int16)
        finally:
            es.chunks = []
        wav = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
        if self.sample_rate_out != self.sample_rate_native and wav.numel():
            wav = AF.resample(wav, self.sample_rate_native, self.sample_rate_out)
        return trim_silence(wav, self.sample_rate_out).contiguous()


def main(argv: list[str] | None = None) -> int:
    """Speak one text into a WAV file; errors are raised for :func:`run_command`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text")
    p.add_argument("--out", type=Path, required=True, help="WAV file to write")
    p.add_argument("--voice", default="en-us")
    p.add_argument("--variant", default=None, help="m1..m8, f1..f5, klatt ...")
    p.add_argument("--rate", type=int, default=175, help="words per minute, 80-450")
    p.add_argument("--pitch", type=int, default=50, help="0-100")
    p.add_argument("--sample-rate", type=int, default=16000)
    add_debug_flag(p)
    a = p.parse_args(argv)
    for flag, value, lo, hi in (("--rate", a.rate, 80, 450), ("--pitch", a.pitch, 0, 100)):
        if not lo <= value <= hi:
            raise UserError(f"{flag} must be in {lo}..{hi}, got {value}")
    if a.sample_rate < 1:
        raise UserError(f"--sample-rate must be >= 1 Hz, got {a.sample_rate}")
    synth = EspeakSynth(a.sample_rate)
    wav = synth.synthesize(a.text, a.voice, a.variant, rate=a.rate, pitch=a.pitch)
    save_audio(a.out, wav, synth.sample_rate_out)
    print(f"{a.out}: {wav.numel() / synth.sample_rate_out:.2f} s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_command(main))
