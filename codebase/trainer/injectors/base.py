"""The injector base class and the two structural injectors: ``generator`` and ``for_each``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.component import Component, ComponentSpec, Gate
from utils.registry import Registry, did_you_mean
from utils.schema import Problems, Runtime

INJECTORS: Registry = Registry("injector")


class Injector(Component, nn.Module):
    """Reads ``in`` keys of the state and returns a dict of new ``out`` keys.

    Common YAML options: ``in`` (a key, a list of keys, or for ``generator`` a mapping of
    argument name -> key), ``out`` (a key or list), ``train``/``eval`` (run in that mode,
    default true), ``after``/``before``/``every`` (step gates).
    """

    abstract = True
    registry = INJECTORS
    kind = "injector"

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        self.input_map: dict[str, str] | None = spec.input_map
        self.inputs: list[str] = spec.inputs
        self.outputs: list[str] = spec.outputs
        self.in_train: bool = spec.train
        self.in_eval: bool = spec.eval

    @property
    def input(self) -> str:
        """The single input key (for injectors that take one)."""
        return self.inputs[0]

    @property
    def output(self) -> str:
        return self.outputs[0]

    def runs(self, step: int, training: bool) -> bool:
        return (self.in_train if training else self.in_eval) and self.gate.open(step)

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class GeneratorInjector(Injector):
    """Calls network ``generator`` with state keys as arguments (``in``: list -> positional,
    mapping -> keyword) and stores its outputs under ``out``.

    A tuple result is matched to ``out`` in order; a dict result is picked by the ``out`` names
    (so a network returning ``{"loss_ar": ..., "acc": ...}`` can be read selectively).
    """

    def __init__(self, generator: str, networks: Runtime[dict[str, nn.Module]]) -> None:
        super().__init__()
        if generator not in networks:
            raise KeyError(
                f"generator injector: no network called {generator!r}"
                f"{did_you_mean(generator, networks)}"
            )
        self.generator = generator
        self._networks = networks  # a plain dict: the networks are not this injector's children

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        net = self._networks[self.generator]
        if self.input_map is not None:
            result = net(**{arg: state[key] for arg, key in self.input_map.items()})
        else:
            result = net(*[state[k] for k in self.inputs])
        return match_outputs(result, self.outputs, f"network {self.generator!r}")


def match_outputs(result: Any, outputs: list[str], what: str) -> dict[str, Any]:
    """Pair a module's result (tensor, tuple or dict) with the ``out`` keys."""
    if isinstance(result, dict):
        missing = [k for k in outputs if k not in result]
        if missing:
            raise KeyError(f"{what} returned keys {sorted(result)}, but out asks for {missing}")
        return {k: result[k] for k in outputs}
    if isinstance(result, (tuple, list)):
        if len(result) < len(outputs):
            raise ValueError(f"{what} returned {len(result)} values for {len(outputs)} out keys")
        return dict(zip(outputs, result))
    if len(outputs) != 1:
        raise ValueError(f"{what} returned one value for {len(outputs)} out keys {outputs}")
    return {outputs[0]: result}


class ForEachInjector(Injector):
    """Applies injector ``subtype`` to each element of the first input: a list, or a tensor
    iterated along dim 1 (e.g. ``[B, N_conditioning, ...]``). Tensor results of equal shape
    are stacked back along dim 1; otherwise a list is returned. Other options go to the
    sub-injector (DLAS: ``type: for_each, subtype: torch_mel_spectrogram, ...``)."""

    def __init__(self, sub: Injector) -> None:
        super().__init__()
        self.sub = sub

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path) -> dict:
        if "subtype" not in options:
            problems.add(
                f"{path}.subtype",
                "missing required option: the injector to apply "
                f"to each item ({', '.join(INJECTORS.names())})",
            )
            return {}
        try:
            sub = INJECTORS.get(options["subtype"])
        except KeyError as e:
            problems.add(f"{path}.subtype", str(e))
            return {}
        if sub is cls:
            problems.add(f"{path}.subtype", "for_each cannot nest for_each")
            return {}
        rest = {k: v for k, v in options.items() if k != "subtype"}
        bound = sub.check_options(rest, path, problems, base_dir)
        return {"sub": ComponentSpec(options["subtype"], path, sub, bound)}

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        # The sub-injector sees for_each's keys and runs whenever for_each does.
        self.sub.configure(replace(spec, cls=type(self.sub), gate=Gate()))

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        value = state[self.input]
        items = list(value) if isinstance(value, (list, tuple)) else list(value.unbind(1))
        results = [self.sub({**state, self.input: item}) for item in items]
        out = {}
        for key in self.outputs:
            values = [r[key] for r in results]
            same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
            out[key] = torch.stack(values, dim=1) if values and same else values
        return out
