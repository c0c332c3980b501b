"""Training part of a network: a step's ``freeze`` patterns and ``param_groups``.

Patterns are :func:`fnmatch.fnmatchcase` patterns on parameter names as ``named_parameters``
gives them (``layers.0.*``, ``layers.[0-3].*``; ``*`` also matches dots); a pattern naming a
module (``layers.0``) also matches every parameter under it, and a tied parameter is matched by
any of its names.

A frozen parameter gets ``requires_grad=False`` and stays out of the optimizer. Every other one
goes to the first ``param_groups`` entry that matches it, with that entry's options over the
step's ``optimizer_params``, or to the rest, with ``optimizer_params`` alone. Freeze wins over
a group. Each entry becomes its own optimizer param group(s) (the optimizer may still split one
into decayed and undecayed parameters), and the LR schedule keeps a base lr per param group, so
it scales each entry's own lr.

The selection runs twice: at validation on the network built on the meta device (so
``--dry-run`` reports a pattern that matches nothing), and when the trainer builds the optimizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn
from torch.optim import Optimizer

from trainer.optimizers import build_optimizer
from utils.registry import did_you_mean
from utils.schema import _MISSING, Problems, bind_options, coerce, is_mapping

REST = "rest"  # the label of the parameters that no param_groups entry matches


@dataclass
class ParamGroupSpec:
    """One ``steps.<name>.param_groups`` entry: ``{match: pattern(s), <optimizer option>: ...}``."""

    match: list[str]  # the entry takes the (unfrozen, untaken) parameters these match
    match_paths: list[str]  # the YAML path of each pattern, for errors
    options: dict  # optimizer options over the step's optimizer_params (validated)
    path: str  # ``steps.fit.param_groups[0]``

    @property
    def label(self) -> str:
        return ",".join(self.match)


@dataclass
class Bucket:
    """The parameters of one optimizer param group entry and its optimizer options."""

    label: str
    options: dict
    params: list[nn.Parameter]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class Selection:
    """What a step trains of its network: frozen parameters and the groups of the others."""

    total: int  # elements of every parameter of the network (tied ones once)
    frozen: list[nn.Parameter]  # by a pattern, or already by the network (requires_grad false)
    buckets: list[Bucket]  # the rest first (if any), then each entry's, in order; none empty
    freeze_patterns: int

    @property
    def trainable(self) -> int:
        return sum(b.numel for b in self.buckets)


def validate_param_groups(
    raw: Any, optimizer: Callable | None, path: str, problems: Problems, base: Path
) -> list[ParamGroupSpec]:
    """``steps.<name>.param_groups``: a list of mappings, each with ``match`` and options of
    the step's optimizer (``optimizer``: its factory; None when unknown, already reported)."""
    where = f"{path}.param_groups"
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(
            where,
            f"expected a list of {{match: <pattern>, <optimizer option>: <value>, ...}}, "
            f"got {type(raw).__name__}",
        )
        return []
    groups = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not is_mapping(entry, at, problems):
            continue
        options = {k: v for k, v in entry.items() if k != "match"}
        if "match" not in entry:
            problems.add(
                f"{at}.match",
                "missing required option: the pattern (or list of patterns) of the "
                "parameter names this group takes",
            )
            continue
        match = coerce(entry["match"], str | list[str], f"{at}.match", problems, base)
        if match is _MISSING:
            continue
        if isinstance(match, str):
            patterns, paths = [match], [f"{at}.match"]
        else:
            patterns, paths = match, [f"{at}.match[{j}]" for j in range(len(match))]
        if not patterns:
            problems.add(f"{at}.match", "is empty; give at least one pattern")
            continue
        if optimizer is not None:
            options = bind_options(optimizer, options, at, problems, base_dir=base, partial=True)
        groups.append(ParamGroupSpec(patterns, paths, options, at))
    return groups


def check_step_patterns(
    steps: dict[str, Any], network: Callable[[str], nn.Module | None], problems: Problems
) -> None:
    """Validation of every step's ``freeze`` and ``param_groups`` (``steps``: the validated
    StepSpecs) against ``network(name)``, the network built on the meta device (None when it
    cannot be: then the trainer checks the real one). Records what each step trains in its
    ``trainable_summary`` for ``--dry-run``."""
    _check_shared_freeze(steps, problems)
    for name, step in steps.items():
        if step is None or not (step.freeze or step.param_groups):
            continue
        net = network(step.training)
        if net is None:
            continue
        selection = select_parameters(
            net,
            step.training,
            step.freeze,
            step.param_groups,
            step.optimizer_params,
            f"steps.{name}",
            problems,
        )
        lrs = [b.options.get("lr") for b in selection.buckets]
        step.trainable_summary = describe(name, selection, lrs)


def _check_shared_freeze(steps: dict[str, Any], problems: Problems) -> None:
    """Steps that train the same network freeze the same parameters: requires_grad belongs
    to the network (and DDP fixes the set of parameters with gradients when it wraps it)."""
    first: dict[str, str] = {}
    for name, spec in steps.items():
        if spec is None:
            continue
        other = first.setdefault(spec.training, name)
        if other != name and sorted(steps[other].freeze) != sorted(spec.freeze):
            problems.add(
                f"steps.{name}.freeze",
                f"is {spec.freeze} but steps.{other}, which trains the same network "
                f"{spec.training!r}, freezes {steps[other].freeze}; steps sharing a network "
                "must freeze the same parameters (param_groups may differ)",
            )


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the parameter ``name`` or a module above it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def select_parameters(
    network: nn.Module,
    net_name: str,
    freeze: list[str],
    groups: list[ParamGroupSpec],
    defaults: dict,
    path: str,
    problems: Problems,
) -> Selection:
    """Split ``network``'s parameters by ``freeze`` and ``groups`` (``defaults``: the step's
    optimizer_params). A pattern that matches nothing, a group left empty, or nothing left to
    train are problems at their YAML path under ``path`` (``steps.fit``)."""
    named: dict[int, tuple[nn.Parameter, list[str]]] = {}  # in the network's order
    for name, p in network.named_parameters(remove_duplicate=False):
        named.setdefault(id(p), (p, []))[1].append(name)
    names = [n for _, ns in named.values() for n in ns]

    def hits(pattern: str, at: str) -> list[int]:
        found = [pid for pid, (_, ns) in named.items() if any(matches(n, pattern) for n in ns)]
        if not found:
            problems.add(at, _no_match(pattern, names, net_name))
        return found

    # parameter -> "freeze", "network" (the model itself keeps it fixed: requires_grad false,
    # e.g. unified_voice2's freeze_everything_but_position_embeddings) or the group's path
    owner = {pid: "network" for pid, (p, _) in named.items() if not p.requires_grad}
    for i, pattern in enumerate(freeze):
        owner.update((pid, "freeze") for pid in hits(pattern, f"{path}.freeze[{i}]"))
    if named and len(owner) == len(named):
        problems.add(
            f"{path}.freeze" if freeze else f"{path}.training",
            f"network {net_name!r} has no parameter left to train"
            + ("; narrow the freeze patterns" if freeze else ""),
        )
    buckets = []
    for group in groups:
        found = [hits(p, at) for p, at in zip(group.match, group.match_paths)]
        for pid in (pid for f in found for pid in f):
            owner.setdefault(pid, group.path)
        params = [p for pid, (p, _) in named.items() if owner.get(pid) == group.path]
        if params:
            buckets.append(Bucket(group.label, {**defaults, **group.options}, params))
        elif all(found):
            problems.add(group.path, _empty_group(sorted({owner[pid] for f in found for pid in f})))
    rest = [p for pid, (p, _) in named.items() if pid not in owner]
    if rest:
        buckets.insert(0, Bucket(REST, dict(defaults), rest))
    frozen = [p for pid, (p, _) in named.items() if owner.get(pid) in ("freeze", "network")]
    total = sum(p.numel() for p, _ in named.values())
    return Selection(total, frozen, buckets, len(freeze))


def build_step_optimizer(
    name: str, network: nn.Module, selection: Selection, where: str
) -> tuple[Optimizer, list[str]]:
    """Freeze the selection's frozen parameters and build optimizer ``name`` over the rest,
    one factory call per bucket merged into one optimizer. Returns it and the bucket label of
    each of its param groups."""
    for p in selection.frozen:
        p.requires_grad_(False)
    optimizer, labels = None, []
    for bucket in selection.buckets:
        # A factory builds over the module's parameters that require grad (as
        # optimizers.param_groups does): for the time of the call, only this bucket's do.
        with _only_trainable(network, bucket.params):
            part = build_optimizer(name, network, bucket.options, where)
        taken = {id(p) for g in part.param_groups for p in g["params"]}
        if not taken <= {id(p) for p in bucket.params}:
            raise TypeError(
                f"{where}: optimizer {name!r} took parameters that do not require grad, so "
                "freeze and param_groups cannot work with it; its factory must build over "
                "the parameters of `module` with requires_grad (see optimizers.param_groups)"
            )
        if optimizer is None:
            optimizer = part
        else:
            for group in part.param_groups:
                optimizer.add_param_group(group)
        labels += [bucket.label] * len(part.param_groups)
    if optimizer is None:  # reported by select_parameters at validation
        raise ValueError(f"{where}: no parameter to train")
    return optimizer, labels


def describe(step: str, selection: Selection, lrs: list[float | None]) -> str:
    """One log line: ``steps.fit: 1,234 of 5,678 parameters trainable (2 frozen patterns);
    groups: layers.* 1,000 lr 0.0001, rest 234 lr 0.001`` (``lrs``: one per bucket)."""
    line = f"steps.{step}: {selection.trainable:,} of {selection.total:,} parameters trainable"
    n = selection.freeze_patterns
    if n:
        line += f" ({n} frozen pattern{'s' if n != 1 else ''})"
    if any(b.label != REST for b in selection.buckets):
        line += "; groups: " + ", ".join(
            f"{b.label} {b.numel:,}" + (f" lr {lr:g}" if lr is not None else "")
            for b, lr in zip(selection.buckets, lrs)
        )
    return line


@contextlib.contextmanager
def _only_trainable(network: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    keep = {id(p) for p in params}
    before = [(p, p.requires_grad) for p in network.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def _empty_group(owners: list[str]) -> str:
    why = []
    if "freeze" in owners:
        why.append("frozen (freeze wins over a group)")
    if "network" in owners:
        why.append("kept fixed by the network itself (requires_grad false)")
    earlier = [o for o in owners if o not in ("freeze", "network")]
    if earlier:
        why.append(f"in {', '.join(earlier)} (the first matching group wins)")
    return (
        f"takes no parameter: every one its patterns match is {' or '.join(why)}; remove "
        "the group or change its patterns"
    )


def _no_match(pattern: str, names: list[str], net_name: str) -> str:
    """A pattern that matches nothing: the closest names and where the parameters are."""
    modules = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    hint = did_you_mean(pattern, [*names, *modules, *(f"{m}.*" for m in modules)])
    tops: dict[str, str] = {}  # top-level name (or module.*) -> its first parameter
    for n in names:
        tops.setdefault(n if "." not in n else n.split(".")[0] + ".*", n)
    shown = list(tops)[:12] + (["..."] if len(tops) > 12 else [])
    examples = [n for n in tops.values() if "." in n][:3]
    eg = f" (e.g. {', '.join(examples)})" if examples else ""
    return (
        f"no parameter of network {net_name!r} matches {pattern!r}{hint}; its {len(names)} "
        f"parameters: {', '.join(shown)}{eg}"
    )
