"""Reading an experiment YAML: overrides, ``${a.b}`` interpolation, plugins.

Validation against the schema lives in :mod:`trainer.config`; this module only turns a file
(plus ``-o key.sub=value`` overrides) into a plain, fully resolved dict.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from utils.errors import DEBUG_FLAG, DEBUG_HELP
from utils.schema import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 demands ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=_Loader), "")
        if duplicates:
            raise ConfigError(duplicates, source)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError([("", f"invalid YAML: {e}")], source) from None


def _duplicate_keys(
    node: yaml.Node | None, path: str, visited: set[int] | None = None
) -> list[tuple[str, str]]:
    """Keys given twice in one mapping (plain YAML silently keeps the last), with both lines."""
    found: list[tuple[str, str]] = []
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias of a node already checked (or a recursive one)
        return found
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            where = f"{path}.{key}" if path else key
            if key in seen:
                found.append(
                    (
                        where,
                        f"given twice, at lines {seen[key]} and {line}; keep one "
                        "(YAML would silently use the last)",
                    )
                )
            seen.setdefault(key, line)
            found += _duplicate_keys(value_node, where, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{path}[{i}]", visited)
    return found


def experiment_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the options every experiment CLI takes: ``-opt FILE``, ``-o KEY=VALUE``
    and ``--debug``."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("-opt", "--opt", required=True, help="experiment YAML file")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an option, e.g. -o train.niter=100 (value parsed as YAML)",
    )
    # The `deepspeed` launcher appends --local_rank=N; the LOCAL_RANK variable it also sets is
    # what the trainer reads.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_debug_flag(p)
    return p


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    """Document ``--debug`` in a CLI's help (:func:`utils.errors.run_command` acts on it)."""
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


T = TypeVar("T")


def load_cli(args: argparse.Namespace, validate: Callable[[dict], T]) -> T:
    """``validate`` applied to the options of a CLI's ``-opt``/``-o`` arguments (see
    :func:`experiment_parser`). A bad file or option raises (``ConfigError``, or
    ``FileNotFoundError`` for a missing ``-opt`` file); the command's error boundary
    (:func:`utils.errors.run_command`) prints it. Also sets up warning-level logging."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return validate(load_options(args.opt, args.override))


def find_options_file(path: str | Path) -> Path:
    """``path`` as given (from the working directory), else relative to the repository root.

    This lets ``python train.py -opt experiments/x.yml`` work from ``codebase/`` too.
    """
    p = Path(path).expanduser()
    for candidate in (p, REPO_ROOT / p):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"experiment file {str(path)!r} not found (looked in {Path.cwd()} and {REPO_ROOT})"
    )


def apply_override(opt: dict, assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as YAML) to ``opt`` in place."""
    if "=" not in assignment:
        raise ConfigError([("", f"override {assignment!r} must look like key.sub=value")])
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError([("", f"override {assignment!r} has an empty key")])
    node = opt
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                [
                    (
                        ".".join(keys[: i + 1]),
                        f"override {assignment!r}: this key holds a "
                        f"{type(child).__name__}, not a mapping",
                    )
                ]
            )
        node = child
    node[keys[-1]] = parse_yaml(raw, f"override {assignment!r}")


def resolve_interpolations(opt: dict, source: str) -> dict:
    """Resolve ``${a.b}`` references (omegaconf syntax, incl. ``${oc.env:VAR,default}``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if "${" not in yaml.safe_dump(opt):
        return opt
    try:
        return OmegaConf.to_container(OmegaConf.create(opt), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).splitlines()[0]
        raise ConfigError([(str(key), f"cannot resolve interpolation: {msg}")], source) from None


def load_options(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read an experiment file into a resolved dict.

    Adds two private keys: ``_file`` (the YAML's absolute path) and ``_base_dir`` (its folder,
    against which relative paths are resolved).
    """
    file = find_options_file(path)
    opt = parse_yaml(file.read_text(), str(file))
    if not isinstance(opt, dict):
        raise ConfigError([("", "the experiment file must be a mapping of sections")], file)
    for assignment in overrides:
        apply_override(opt, assignment)
    opt = resolve_interpolations(opt, str(file))
    opt["_file"] = str(file)
    opt["_base_dir"] = str(file.parent)
    return opt


def options_from_dict(opt: dict, base_dir: str | Path) -> dict:
    """The dict form of :func:`load_options` for experiments built in code (tests, scripts)."""
    opt = resolve_interpolations(copy.deepcopy(opt), "<dict>")
    opt.setdefault("_file", "<dict>")
    opt["_base_dir"] = str(Path(base_dir).resolve())
    return opt


def public(opt: dict) -> dict:
    """The options without the private ``_file``/``_base_dir`` keys (to save or log)."""
    return {k: v for k, v in opt.items() if not k.startswith("_")}


def import_plugins(plugins: list[str], base_dir: Path) -> None:
    """Import user modules that register more components.

    Each entry is a module name (``my_pkg.injectors``) or a ``.py`` file path (relative to the
    experiment file's folder).
    """
    for i, plugin in enumerate(plugins):
        where = f"plugins[{i}]"
        if plugin.endswith(".py") or "/" in plugin:
            file = Path(plugin) if Path(plugin).is_absolute() else base_dir / plugin
            if not file.is_file():
                raise ConfigError([(where, f"plugin file {str(file)!r} not found")])
            name = f"_plugin_{file.stem}_{abs(hash(str(file.resolve()))) % 10**8}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[name]
                raise
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as e:
                if e.name and plugin.startswith(e.name):
                    raise ConfigError(
                        [
                            (
                                where,
                                f"plugin module {plugin!r} cannot be imported "
                                f"({e}); is it on PYTHONPATH?",
                            )
                        ]
                    ) from None
                raise
