"""Injectors: state dict in, new keys out. Importing this package registers the built-ins."""

from trainer.injectors import audio, codec, text  # noqa: F401,E402 - register the audio injectors
from trainer.injectors.base import INJECTORS, ForEachInjector, GeneratorInjector, Injector

__all__ = ["INJECTORS", "Injector", "GeneratorInjector", "ForEachInjector"]
