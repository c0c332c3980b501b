"""The injector base class and the two structural injectors: ``generator`` and ``for_each``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.component import Component
from trainer.registry import Registry
from utils.schema import Problems

INJECTORS: Registry = Registry("injector")


class Injector(Component):
    """Reads ``in`` keys of the state and returns a dict of new ``out`` keys.

    Common YAML options: ``in`` (a key, a list of keys, or for ``generator`` a mapping of
    argument name -> key), ``out`` (a key or list), ``train``/``eval`` (run in that mode,
    default true), ``after``/``before``/``every`` (step gates).
    """

    abstract = True
    registry = INJECTORS
    kind = "injector"

    def configure(self, common: dict) -> None:
        super().configure(common)
        raw_in = common.get("in", [])
        self.input_map: dict[str, str] | None = raw_in if isinstance(raw_in, dict) else None
        self.inputs: list[str] = (list(raw_in.values()) if isinstance(raw_in, dict)
                                  else [raw_in] if isinstance(raw_in, str) else list(raw_in))
        raw_out = common.get("out", [])
        self.outputs: list[str] = [raw_out] if isinstance(raw_out, str) else list(raw_out)
        self.in_train: bool = common.get("train", True)
        self.in_eval: bool = common.get("eval", True)

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

    runtime_args = ("networks",)

    def __init__(self, generator: str, networks: dict[str, nn.Module]) -> None:
        super().__init__()
        if generator not in networks:
            from trainer.registry import did_you_mean
            raise KeyError(f"generator injector: no network called {generator!r}"
                           f"{did_you_mean(generator, networks)}")
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

    runtime_args = ("runtime",)

    def __init__(self, subtype: str, options: dict, runtime: dict[str, Any]) -> None:
        super().__init__()
        cls = INJECTORS.get(subtype)
        self.sub = cls(**options, **{a: runtime[a] for a in cls.runtime_args})

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path,
                      common_keys: tuple[str, ...] = ()) -> dict:
        if "subtype" not in options:
            problems.add(f"{path}.subtype", "missing required option: the injector to apply "
                                            f"to each item ({', '.join(INJECTORS.names())})")
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
        bound = sub.check_options(rest, path, problems, base_dir, common_keys)
        return {"subtype": options["subtype"], "options": bound}

    def configure(self, common: dict) -> None:
        super().configure(common)
        self.sub.configure({**common, "after": 0, "before": None, "every": 1})

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
