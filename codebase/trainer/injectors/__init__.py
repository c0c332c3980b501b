"""Injectors: state dict in, new keys out. Importing this package registers the built-ins."""
from trainer.injectors.base import INJECTORS, ForEachInjector, GeneratorInjector, Injector
from trainer.injectors import audio, codec, text  # noqa: F401,E402 - register the audio injectors

__all__ = ["INJECTORS", "Injector", "GeneratorInjector", "ForEachInjector"]
