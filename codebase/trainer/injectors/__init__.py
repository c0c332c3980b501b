"""Injectors: state dict in, new keys out. Importing this package registers the built-ins."""

from trainer.injectors import audio, codec, dvae, text  # noqa: F401,E402 - register the built-ins
from trainer.injectors.base import INJECTORS, ForEachInjector, GeneratorInjector, Injector

__all__ = ["INJECTORS", "Injector", "GeneratorInjector", "ForEachInjector"]
