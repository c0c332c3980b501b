"""Base of injectors, losses and evaluators: auto-registration, gates, runtime arguments."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.registry import Registry, component_name
from utils.schema import Problems, bind_options


@dataclass
class Gate:
    """Run at step ``s`` when ``after <= s``, ``s < before`` (if set) and ``s % every == 0``."""
    after: int = 0
    before: int | None = None
    every: int = 1

    def open(self, step: int) -> bool:
        return (step >= self.after and (self.before is None or step < self.before)
                and step % self.every == 0)


@dataclass
class TrainerEnv:
    """What the trainer shares with components at run time (passed as the ``env`` argument)."""
    device: torch.device
    run_dir: Path
    step: int = 0
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


class Component(nn.Module):
    """A YAML-declared part. Subclasses register under snake_case(ClassName) minus the kind
    suffix (``TorchMelSpectrogramInjector`` -> ``torch_mel_spectrogram``) unless they set
    ``name``; a class with ``abstract = True`` in its body is not registered.

    The constructor's keyword arguments are the YAML options. Names in ``runtime_args`` are
    passed by the trainer (``networks``, ``env`` ...) and cannot be set from the YAML.
    """

    registry: ClassVar[Registry]
    kind: ClassVar[str] = "component"
    runtime_args: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("abstract", False):
            cls.registry.add(component_name(cls, cls.kind), cls)

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path,
                      common_keys: tuple[str, ...] = ()) -> dict:
        """Validate this component's own YAML options; returns the constructor kwargs."""
        return bind_options(cls, options, path, problems, runtime=cls.runtime_args,
                            base_dir=base_dir)

    def configure(self, common: dict) -> None:
        """Apply the options every component of this kind shares (gates ...)."""
        self.gate = Gate(common.get("after", 0), common.get("before"), common.get("every", 1))


def build_component(spec: Any, runtime: dict[str, Any]) -> Component:
    """Construct a validated :class:`trainer.config.ComponentSpec` with its runtime arguments."""
    missing = [a for a in spec.cls.runtime_args if a not in runtime]
    if missing:
        raise RuntimeError(f"{spec.path}: the trainer cannot provide {missing} to {spec.cls.__name__}")
    obj = spec.cls(**spec.kwargs, **{a: runtime[a] for a in spec.cls.runtime_args})
    obj.configure(spec.common)
    obj.component_name = spec.name
    obj.path = spec.path
    return obj
