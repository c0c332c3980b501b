"""One registry class for every kind of component (injectors, losses, models, datasets ...).

Components are found by name from the experiment YAML. An unknown name fails with the names
that come closest; a duplicate name or a class of the wrong base fails at import.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Generic, Iterator, TypeVar

from utils.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown or duplicate component name (a command exits with the usage code 2)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


def snake_case(name: str) -> str:
    """``TorchMelSpectrogramInjector`` -> ``torch_mel_spectrogram_injector``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def component_name(cls: type, suffix: str) -> str:
    """Registry name of a class: snake_case(ClassName) minus ``_<suffix>``, unless ``cls.name``."""
    explicit = cls.__dict__.get("name")
    if isinstance(explicit, str):
        return explicit
    name = snake_case(cls.__name__)
    tail = "_" + suffix
    return name[: -len(tail)] if name.endswith(tail) and name != tail[1:] else name


def did_you_mean(word: str, choices: Any, n: int = 3) -> str:
    """`` (did you mean 'x'?)`` for the closest choices, or ``""`` if none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


class Registry(Generic[T]):
    """Maps names to classes or factories of one kind.

    Args:
        kind: what is registered ("injector", "loss", "model" ...), used in messages.
        base: when given, everything registered must be a subclass of it.
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` (default name: the object's ``__name__``)."""

        def decorator(obj: T) -> T:
            self.add(name or obj.__name__, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise TypeError(
                f"cannot register {obj!r} as a {self.kind}: it is not a subclass of "
                f"{self.base.__name__}"
            )
        existing = self._entries.get(name)
        if existing is not None and existing is not obj:
            if _same_definition(existing, obj):  # a module imported twice (plugin by path)
                self._entries[name] = obj
                return
            raise RegistryError(
                f"{self.kind} name {name!r} is registered twice: by "
                f"{_where(existing)} and by {_where(obj)}; rename one of them"
            )
        self._entries[name] = obj

    def get(self, name: str, where: str = "") -> T:
        """The entry called ``name``; an unknown name raises with the closest names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            prefix = f"{where}: " if where else ""
            raise RegistryError(
                f"{prefix}unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}. "
                f"Registered {self.kind}s: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def _same_definition(a: Any, b: Any) -> bool:
    return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) and (
        getattr(a, "__module__", None) == getattr(b, "__module__", None)
    )
