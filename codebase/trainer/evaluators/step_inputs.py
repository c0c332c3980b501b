"""The inputs a network gets in training, made for an evaluator by the experiment's own injectors.

An evaluator of a model trained on derived inputs (Tortoise's GPT reads DVAE codes of mels of
the batch's audio; a DVAE reads mels) must see exactly what training feeds it. Rather than
rebuilding mel settings, norms or the DVAE from its own options, it runs the injectors of the
step that trains the network, in eval mode, up to the ``generator`` injector that calls the
network, and reads that injector's inputs::

    inputs = StepInputs(steps, "gpt", ("speech_conditioning_input", "text_inputs", ...))
    state = inputs.prepare(batch, step)              # the batch plus every injector's outputs
    cond = state[inputs.keys["speech_conditioning_input"]]
    mel_injector = inputs.producer(inputs.keys["mel_codes"])   # who made a key
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from trainer.injectors.base import ForEachInjector, GeneratorInjector, Injector


class StepInputs:
    """Finds the step that trains ``network`` and its generator injector for it.

    Args:
        steps: the trainer's steps (name -> ConfigurableStep).
        network: the network whose inputs are wanted.
        arguments: the network's forward argument names, in order: a positional ``in`` list
            is matched to them by position, a mapping by name.
        step: the step to read (None: the one whose ``training`` is ``network``).
        what: the evaluator's name, for error messages.

    Raises ValueError naming what is missing (no such step, no generator injector calling the
    network, an argument the injector does not give).
    """

    def __init__(
        self,
        steps: dict[str, Any],
        network: str,
        arguments: Sequence[str],
        step: str | None = None,
        what: str = "evaluator",
    ) -> None:
        if step is None:
            training = [n for n, s in steps.items() if s.spec.training == network]
            if not training:
                raise ValueError(
                    f"{what}: no step trains network {network!r} (steps: {sorted(steps)}); "
                    f"set `step:` to the step whose injectors make its inputs"
                )
            step = training[0]
        if step not in steps:
            raise ValueError(f"{what}: no step {step!r}; the steps are {sorted(steps)}")
        injectors: list[Injector] = list(steps[step].injectors)
        calls = [
            i
            for i, inj in enumerate(injectors)
            if isinstance(inj, GeneratorInjector) and inj.generator == network
        ]
        if not calls:
            raise ValueError(
                f"{what}: step {step!r} has no generator injector calling {network!r}; the "
                f"evaluator reads that injector's inputs"
            )
        self.step_name = step
        self.call = injectors[calls[0]]
        self.before = injectors[: calls[0]]
        if self.call.input_map is not None:
            keys = dict(self.call.input_map)
        else:
            keys = dict(zip(arguments, self.call.inputs))
        missing = [a for a in arguments if a not in keys]
        if missing:
            raise ValueError(
                f"{what}: {self.call.path} does not give {network!r} the arguments {missing} "
                f"(its `in`: {self.call.input_map or self.call.inputs})"
            )
        self.keys: dict[str, str] = {a: keys[a] for a in arguments}

    def prepare(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch plus the outputs of every injector before the network's call that runs
        in eval mode at ``step``, without gradients."""
        state = dict(batch)
        with torch.no_grad():
            for inj in self.before:
                if inj.runs(step, training=False):
                    state.update(inj(state))
        return state

    def producer(self, key: str, kind: type | None = None) -> Injector | None:
        """The injector before the call whose ``out`` has ``key`` (the sub-injector of a
        ``for_each``), if it is of type ``kind`` (any when None); else None."""
        for inj in reversed(self.before):
            if key in inj.outputs:
                found = inj.sub if isinstance(inj, ForEachInjector) else inj
                return found if kind is None or isinstance(found, kind) else None
        return None
