"""Strict validation of options against type hints: dataclass schemas and constructor signatures.

Every experiment section and every component is checked here. Problems are collected with the
full key path (``steps.gpt.injectors.mel.n_mel``) and reported all at once in a
:class:`ConfigError`; nothing reads a missing key as ``None``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, NewType, Union

from utils.errors import UserError
from utils.registry import Registry, RegistryError, did_you_mean

StateKey = NewType("StateKey", str)
"""Annotation for an option that names a key of the training state (checked at start-up)."""


_RUNTIME = "runtime"  # the marker Runtime[T] puts in typing.Annotated


class Runtime:
    """``Runtime[T]`` marks a constructor argument that the trainer passes when it builds the
    component (``networks``, ``env``, ``module`` for an optimizer, ``phase`` for a dataset ...),
    never the YAML. It is the one way runtime objects reach a component: :func:`bind_options`
    refuses such a key in the YAML and :func:`construct` fills it in."""

    def __class_getitem__(cls, hint: Any) -> Any:
        return Annotated[hint, _RUNTIME]


def _is_runtime(hint: Any) -> bool:
    return typing.get_origin(hint) is Annotated and _RUNTIME in hint.__metadata__


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number, checked at validation with the types: ``Annotated[int, Range(1)]``."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False  # > min rather than >= min
    max_open: bool = False  # < max rather than <= max

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {self.max:g}")
        return " and ".join(parts)

    def holds(self, value: float) -> bool:
        lo = self.min is None or (value > self.min if self.min_open else value >= self.min)
        hi = self.max is None or (value < self.max if self.max_open else value <= self.max)
        return lo and hi


PositiveInt = Annotated[int, Range(1)]  # sizes, counts, frequencies
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, min_open=True)]  # learning rates, clip norms
Fraction = Annotated[float, Range(0, 1, max_open=True)]  # dropout and other rates in [0, 1)


class ConfigError(UserError, ValueError):
    """One or more problems in an experiment's options, each with its key path."""

    def __init__(self, problems: list[tuple[str, str]], source: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.source = str(source) if source else None
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" in {self.source}" if self.source else ""
        head = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}{where}:"
        return "\n".join([head] + [f"  - {p}: {m}" if p else f"  - {m}" for p, m in self.problems])


class Problems:
    """Collects (key path, message) pairs while a whole experiment is walked."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, source: str | Path | None = None) -> None:
        if self.items:
            raise ConfigError(self.items, source)


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_MISSING = object()


def coerce(value: Any, hint: Any, path: str, problems: Problems, base_dir: Path | None) -> Any:
    """Check ``value`` against ``hint``; returns it converted (int->float, str->Path, dicts->
    dataclasses) or ``_MISSING`` after recording a problem."""
    if hint is Any or hint is inspect.Parameter.empty or hint is object:
        return value
    if typing.get_origin(hint) is Annotated:
        out = coerce(value, typing.get_args(hint)[0], path, problems, base_dir)
        for bound in (m for m in hint.__metadata__ if isinstance(m, Range)):
            if out is not _MISSING and out is not None and not bound.holds(out):
                problems.add(path, f"must be {bound.describe()}, got {out!r}")
                return _MISSING
        return out
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is StateKey:
        hint = str
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        for option in sorted(others, key=_specificity):
            trial = Problems()
            out = coerce(value, option, path, trial, base_dir)
            if not trial:
                return out
        if len(others) == 1:  # report the single alternative's own message
            return coerce(value, others[0], path, problems, base_dir)
        problems.add(path, f"expected {type_name(hint)}, got {_show(value)}")
        return _MISSING
    if origin is Literal:
        if value in args:
            return value
        problems.add(
            path,
            f"expected one of {', '.join(repr(a) for a in args)}, got "
            f"{_show(value)}{did_you_mean(value, args)}",
        )
        return _MISSING
    if hint is type(None) or hint is None:
        if value is None:
            return None
        problems.add(path, f"expected null, got {_show(value)}")
        return _MISSING
    if hint is bool:
        return value if isinstance(value, bool) else _bad(value, hint, path, problems)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else _bad(value, hint, path, problems)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _bad(value, hint, path, problems)
    if hint is str:
        return value if isinstance(value, str) else _bad(value, hint, path, problems)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, Path)):
        if not isinstance(value, (str, Path)):
            return _bad(value, hint, path, problems)
        p = Path(value).expanduser()
        return p if p.is_absolute() or base_dir is None else (base_dir / p)
    if origin in (list, tuple, typing.Sequence, Iterable) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _bad(value, hint, path, problems)
        item_hint = args[0] if args else Any
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                problems.add(path, f"expected {len(args)} items, got {len(value)}")
                return _MISSING
            items = [
                coerce(v, a, f"{path}[{i}]", problems, base_dir)
                for i, (v, a) in enumerate(zip(value, args))
            ]
        else:
            items = [
                coerce(v, item_hint, f"{path}[{i}]", problems, base_dir)
                for i, v in enumerate(value)
            ]
        return (
            _MISSING
            if any(i is _MISSING for i in items)
            else (tuple(items) if origin is tuple else list(items))
        )
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return _bad(value, hint, path, problems)
        key_hint, val_hint = args if args else (Any, Any)
        out, failed = {}, False
        for k, v in value.items():
            key_ok = coerce(k, key_hint, join(path, k), problems, base_dir) is not _MISSING
            out[k] = coerce(v, val_hint, join(path, k), problems, base_dir)
            failed = failed or not key_ok or out[k] is _MISSING
        return _MISSING if failed else out
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return _bad(value, hint, path, problems)
        return build_dataclass(hint, value, path, problems, base_dir)
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _bad(value, hint, path, problems)
    return value


def _specificity(hint: Any) -> int:
    """Try narrow types before broad ones in a Union (bool before int before float)."""
    order = {bool: 0, int: 1, float: 2, str: 4}
    return order.get(hint, 3)


def _bad(value: Any, hint: Any, path: str, problems: Problems) -> Any:
    problems.add(path, f"expected {type_name(hint)}, got {_show(value)}")
    return _MISSING


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


def type_name(hint: Any) -> str:
    """A readable name for a type hint: ``list of int``, ``float or null`` ..."""
    if typing.get_origin(hint) is Annotated:
        bounds = [m.describe() for m in hint.__metadata__ if isinstance(m, Range)]
        return " ".join([type_name(typing.get_args(hint)[0]), *bounds])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is StateKey:
        return "state key (str)"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, typing.Sequence):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if hint is type(None):
        return "null"
    if hint is Path:
        return "path"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return {int: "int", float: "float", bool: "bool (true/false)", str: "str"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def build_dataclass(
    cls: type,
    options: dict,
    path: str,
    problems: Problems,
    base_dir: Path | None = None,
    handled: Iterable[str] = (),
) -> Any:
    """Instantiate dataclass ``cls`` from ``options``, checking keys and types strictly.

    ``handled`` names keys the caller validates itself (e.g. a section's components): they
    are skipped here but count as valid in the did-you-mean of an unknown key."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    handled = tuple(handled)
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in handled:
            continue
        if key not in fields:
            valid = [*fields, *handled]
            problems.add(
                join(path, key),
                f"unknown option{did_you_mean(key, valid)}; valid options: {', '.join(valid)}",
            )
            continue
        out = coerce(value, hints[key], join(path, key), problems, base_dir)
        if out is not _MISSING:
            kwargs[key] = out
    for name, f in fields.items():
        if (
            name not in options
            and f.default is dataclasses.MISSING
            and (f.default_factory is dataclasses.MISSING)
        ):
            problems.add(join(path, name), f"missing required option ({type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing or invalid: already reported
        return None


def signature_params(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(named keyword parameters, their resolved type hints, accepts **kwargs)."""
    init = target.__init__ if isinstance(target, type) else target
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:  # unresolvable annotations: fall back to no type checking
        hints = {}
    params, var_kw = {}, False
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            params[name] = p
    return params, hints, var_kw


def runtime_params(target: Callable) -> dict[str, inspect.Parameter]:
    """The arguments of ``target`` annotated :class:`Runtime`."""
    params, hints, _ = signature_params(target)
    return {name: p for name, p in params.items() if _is_runtime(hints.get(name))}


def construct(
    target: Callable, kwargs: dict[str, Any], provided: Mapping[str, Any], where: str
) -> Any:
    """Call ``target`` with its validated YAML ``kwargs`` plus each :class:`Runtime` argument
    it declares, taken from ``provided`` (an argument with a default may be left out)."""
    extra = {}
    for name, p in runtime_params(target).items():
        if name in provided:
            extra[name] = provided[name]
        elif p.default is p.empty:
            raise TypeError(
                f"{where}: {getattr(target, '__name__', target)} needs {name!r}, which "
                f"the trainer does not provide here (it provides: "
                f"{', '.join(provided) or 'nothing'})"
            )
    return target(**kwargs, **extra)


def bind_options(
    target: Callable,
    options: dict,
    path: str,
    problems: Problems,
    *,
    base_dir: Path | None = None,
    partial: bool = False,
) -> dict[str, Any]:
    """Check ``options`` against ``target``'s keyword arguments; returns the coerced kwargs.

    :class:`Runtime` arguments are the trainer's to pass: they may not be set from the YAML
    and are not reported missing. ``partial``: the options override others given elsewhere
    (a param group's over the step's ``optimizer_params``), so none is reported missing.
    """
    params, hints, var_kw = signature_params(target)
    runtime = set(runtime_params(target))
    yaml_params = {k: p for k, p in params.items() if k not in runtime}
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in runtime:
            problems.add(join(path, key), "is set by the trainer and cannot be given in the YAML")
        elif key in yaml_params or var_kw:
            hint = hints.get(key, Any) if key in yaml_params else Any
            out = coerce(value, hint, join(path, key), problems, base_dir)
            if out is not _MISSING:
                kwargs[key] = out
        else:
            valid = ", ".join(yaml_params) or "(none)"
            problems.add(
                join(path, key),
                f"unknown option{did_you_mean(key, yaml_params)}; valid options: {valid}",
            )
    for name, p in yaml_params.items():
        if p.default is p.empty and name not in options and not partial:
            problems.add(
                join(path, name), f"missing required option ({type_name(hints.get(name, Any))})"
            )
    return kwargs


def state_key_options(target: Callable, options: dict) -> list[str]:
    """The values of ``options`` whose parameter is annotated :data:`StateKey` (or a list)."""
    _, hints, _ = signature_params(target)
    keys: list[str] = []
    for name, value in options.items():
        hint = hints.get(name)
        if hint is None or value is None:
            continue
        flat = {hint, *typing.get_args(hint)}
        flat |= {a for h in list(flat) for a in typing.get_args(h)}
        if StateKey in flat:
            keys.extend(value if isinstance(value, (list, tuple)) else [value])
    return keys


# ----------------------------------------------------------- helpers for section validators
def is_mapping(value: Any, path: str, problems: Problems) -> bool:
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping, got {type(value).__name__}")
    return isinstance(value, dict)


def lookup(registry: Registry, name: Any, path: str, problems: Problems) -> Any:
    """``registry.get(name)``, or None after recording the error (with did-you-mean)."""
    try:
        return registry.get(name)
    except RegistryError as e:
        problems.add(path, str(e))
        return None


def split_fields(options: dict, cls: type, exclude: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(options that are fields of dataclass ``cls``, the rest)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init} - set(exclude)
    return (
        {k: v for k, v in options.items() if k in names},
        {k: v for k, v in options.items() if k not in names},
    )


def bind_shared_section(
    section_cls: type,
    target: Callable,
    options: dict,
    path: str,
    problems: Problems,
    base_dir: Path | None,
    exclude: tuple[str, ...] = (),
) -> tuple[Any, dict[str, Any]]:
    """A section whose keys go partly to dataclass ``section_cls`` (e.g. loader options) and
    partly to ``target``'s constructor: ``(the dataclass, target's kwargs)``. A key known to
    neither is reported once, with the valid keys of both."""
    own, rest = split_fields(options, section_cls, exclude)
    section = build_dataclass(section_cls, own, path, problems, base_dir)
    params, _, var_kw = signature_params(target)
    runtime = runtime_params(target)
    valid = [f.name for f in dataclasses.fields(section_cls) if f.init and f.name not in exclude]
    valid += [p for p in params if p not in runtime]
    for key in rest:
        if key not in params and not var_kw:
            problems.add(
                join(path, key),
                f"unknown option{did_you_mean(key, valid)}; valid options: {', '.join(valid)}",
            )
    accepted = {k: v for k, v in rest.items() if k in params or var_kw}
    return section, bind_options(target, accepted, path, problems, base_dir=base_dir)
