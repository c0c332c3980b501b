"""Base of injectors, losses and evaluators: auto-registration, the validated spec, building.

A component's YAML options are its constructor's keyword arguments; the runtime objects it
needs (networks, env, datasets, logger) are constructor arguments annotated
:class:`utils.schema.Runtime`, filled by :func:`build_component` from what the trainer
provides. The options every component of a kind shares (``in``/``out``, ``weight``, the step
gates) are validated once into a :class:`ComponentSpec` and applied by ``configure``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from utils.errors import UserError
from utils.registry import Registry, component_name
from utils.schema import ConfigError, Problems, bind_options, construct


@dataclass
class Gate:
    """Run at step ``s`` when ``after <= s``, ``s < before`` (if set) and ``s % every == 0``."""

    after: int = 0
    before: int | None = None
    every: int = 1

    def open(self, step: int) -> bool:
        return (
            step >= self.after
            and (self.before is None or step < self.before)
            and step % self.every == 0
        )


@dataclass
class ComponentSpec:
    """A validated injector, loss or evaluator: its class, constructor options and the
    options shared by its kind, each in one normalised form."""

    name: str
    path: str  # its key path in the YAML, for messages
    cls: Any
    kwargs: dict  # constructor options (a ComponentSpec value is built first: for_each's sub)
    gate: Gate = field(default_factory=Gate)
    inputs: list[str] = field(default_factory=list)  # `in` as a list of state keys
    input_map: dict[str, str] | None = None  # `in` as argument name -> state key
    outputs: list[str] = field(default_factory=list)  # `out`
    train: bool = True  # an injector runs in training steps
    eval: bool = True  # ... and in validation / evaluation
    weight: float = 1.0  # a loss's weight (0: log only)


@dataclass
class TrainerEnv:
    """What the trainer shares with components at run time (the ``env`` argument)."""

    device: torch.device
    run_dir: Path
    step: int = 0
    precision: str = "fp32"


class Component:
    """A YAML-declared part. Subclasses register under snake_case(ClassName) minus the kind
    suffix (``TorchMelSpectrogramInjector`` -> ``torch_mel_spectrogram``) unless they set
    ``name``; a class with ``abstract = True`` in its body is not registered."""

    registry: ClassVar[Registry]
    kind: ClassVar[str] = "component"
    component_name: str
    path: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("abstract", False):
            cls.registry.add(component_name(cls, cls.kind), cls)

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path) -> dict:
        """Validate this component's own YAML options; returns the constructor kwargs."""
        return bind_options(cls, options, path, problems, base_dir=base_dir)

    def configure(self, spec: ComponentSpec) -> None:
        """Apply the options every component of this kind shares."""
        self.gate = spec.gate


def build_component(spec: ComponentSpec, provided: Mapping[str, Any]) -> Any:
    """Construct a validated component with the runtime objects it declares. A ValueError its
    constructor raises (its own checks of its options, e.g. a file it reads) becomes a
    ``ConfigError`` at its YAML path, as the network checks at validation do."""
    try:
        obj = _construct(spec, provided)
        obj.configure(spec)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError([(spec.path, str(e))]) from e
    obj.component_name = spec.name
    obj.path = spec.path
    return obj


def _construct(spec: ComponentSpec, provided: Mapping[str, Any]) -> Any:
    """The object alone; a nested spec (for_each's sub-injector) is configured by its parent."""
    kwargs = {
        k: _construct(v, provided) if isinstance(v, ComponentSpec) else v
        for k, v in spec.kwargs.items()
    }
    return construct(spec.cls, kwargs, provided, spec.path)
