"""Codec backends. Importing this package registers them: encodec, vocos, dac, mel_rvq."""

from models.audio.codecs import dac, encodec, mel_rvq, vocos  # noqa: F401,E402 - registers the backends
from models.audio.codecs.base import CODECS, Codec, CodecUnavailable, build_codec, register_codec

__all__ = ["CODECS", "Codec", "CodecUnavailable", "build_codec", "register_codec"]
