"""The LoRA networks of a run (``networks.<name>.lora``): their base, adapters, EMA and files.

A LoRA network is built, gets its base weights, then its adapters (:mod:`models.lora`); only
the adapters train. The base is a file, named with its SHA-256 in every adapter checkpoint:

* ``path.pretrain_model_<name>`` when it loaded whole;
* else (no pretrain file, or ``strict_load: false`` left some weights at their random init)
  the initial weights, written once to ``<run>/models/<name>_base.safetensors``.

Resume loads that base again (refusing one whose digest changed), then the adapters of the
checkpoint. The EMA copy of a LoRA network shares the frozen tensors with the live network
and averages only the adapters, so it costs no second copy of the base.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.lora import (
    apply_lora,
    find_base,
    load_adapter_state,
    parameter_counts,
    read_adapters,
    requires_grad_,
)
from trainer.checkpoint import CheckpointManager
from trainer.config import Experiment
from utils import distributed
from utils.errors import CheckpointError
from utils.io import LoadReport, file_sha256, load_module, save_network

log = logging.getLogger(__name__)


@dataclass
class Base:
    """The weights a LoRA network's adapters are trained on."""

    path: Path
    sha256: str
    pretrain: Path | None = None  # the pretrain file it came from, when it had to be written


class LoraNetworks:
    """Attaches adapters to the LoRA networks of ``exp`` and says how to save them."""

    def __init__(self, exp: Experiment, checkpoints: CheckpointManager, is_main: bool) -> None:
        self.exp, self.checkpoints, self.is_main = exp, checkpoints, is_main
        self.bases: dict[str, Base] = {}
        self.lines: list[str] = []  # what was adapted, for the run's log

    def names(self) -> list[str]:
        return [n for n, s in self.exp.networks.items() if s.lora is not None]

    def start(self, name: str, net: nn.Module, report: LoadReport | None) -> None:
        """A fresh run: ``net`` holds its initial (pretrained or random) weights."""
        spec = self.exp.networks[name]
        pretrain = self.exp.path.pretrain.get(name)
        written_from = None
        if pretrain is not None and report is not None and report.ok and not report.grown:
            path = pretrain.resolve()
        else:  # nothing on disk holds exactly these weights (random, partial, grown): write them
            written_from = pretrain
            path = (self.checkpoints.models_dir / f"{name}_base.safetensors").resolve()
            if self.is_main:
                extra = {"network": name, "lora_base": "true"}
                save_network(
                    net, path, which_model=spec.which_model, kwargs=spec.kwargs, extra=extra
                )
            distributed.barrier()  # every rank reads its digest
        self.bases[name] = Base(path, file_sha256(path), written_from)
        self._adapt(name, net)

    def check_saved_kind(self, name: str, step: int) -> None:
        """A checkpoint of step ``step`` holds ``name`` as the YAML now declares it: adapters
        for a LoRA network, whole weights for another."""
        lora = self.exp.networks[name].lora is not None
        whole = self.checkpoints.network_path(step, name)
        adapters = self.checkpoints.network_path(step, name, lora=True)
        if lora and not adapters.is_file() and whole.is_file():
            raise CheckpointError(
                f"networks.{name}.lora is set, but step {step} saved {name} whole ({whole}): it "
                f"was trained without LoRA. Remove networks.{name}.lora to resume; or fine-tune "
                f"those weights with LoRA in a new run: path.pretrain_model_{name}: {whole} with "
                f"path.resume_state: null and another `name`"
            )
        if not lora and adapters.is_file() and not whole.is_file():
            raise CheckpointError(
                f"step {step} saved only LoRA adapters of {name} ({adapters}) but "
                f"networks.{name} has no lora section now; put it back to resume, or merge "
                f"them (python -m models.lora merge --lora {adapters} --out merged.safetensors) "
                f"and start a new run from the merged file"
            )

    def resume(self, name: str, net: nn.Module, step: int) -> None:
        """Resuming: the base the checkpoint's adapters name (its digest checked), then them."""
        adapters = read_adapters(self.checkpoints.network_path(step, name, lora=True))
        path = find_base(adapters)
        load_module(net, path, strict=True)
        self.bases[name] = Base(path.resolve(), adapters.base_sha256, _pretrain(adapters.meta))
        self._adapt(name, net)
        load_adapter_state(net, adapters.tensors, adapters.path)

    def _adapt(self, name: str, net: nn.Module) -> None:
        modules = apply_lora(net, self.exp.networks[name].lora)
        requires_grad_(net, True)
        trainable, total = parameter_counts(net)
        opts = self.exp.networks[name].lora
        self.lines.append(
            f"networks.{name}: LoRA rank {opts.rank}, alpha {opts.alpha:g} on {len(modules)} "
            f"modules over the frozen base {self.bases[name].path}; trainable parameters "
            f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
        )

    def ema(self, net: nn.Module, rate: float) -> AveragedModel:
        """An EMA of ``net`` whose frozen tensors are the live network's own (not copied, not
        averaged): only the adapters are averaged."""
        ema = AveragedModel(
            nn.Identity(), multi_avg_fn=_skip_shared(get_ema_multi_avg_fn(rate)), use_buffers=True
        )
        frozen = {id(p): p for p in net.parameters() if not p.requires_grad}
        ema.module = copy.deepcopy(net, memo=frozen)
        return ema

    def load_ema(self, name: str, module: nn.Module, step: int) -> bool:
        """Load the checkpoint's EMA adapters into ``module``; False when it has none."""
        path = self.checkpoints.network_path(step, name, ema=True, lora=True)
        if not path.exists():
            return False
        load_adapter_state(module, read_adapters(path).tensors, path)
        return True

    def adapter_files(self) -> dict[str, dict]:
        """Per LoRA network, the arguments :func:`models.lora.save_adapters` needs besides the
        network: its options and base."""
        out = {}
        for name, base in self.bases.items():
            extra = {"pretrain": str(base.pretrain)} if base.pretrain else {}
            out[name] = {
                "options": self.exp.networks[name].lora,
                "base": base.path,
                "base_sha256": base.sha256,
                "extra": extra,
            }
        return out


def _pretrain(meta: dict[str, str]) -> Path | None:
    return Path(meta["pretrain"]) if meta.get("pretrain") else None


def _skip_shared(avg: Callable) -> Callable:
    """``avg`` over the (average, live) pairs that are different tensors: the shared frozen
    ones would average to themselves anyway."""

    def update(averaged: list, live: list, n_averaged) -> None:
        pairs = [(a, b) for a, b in zip(averaged, live) if a.data_ptr() != b.data_ptr()]
        if pairs:
            avg([a for a, _ in pairs], [b for _, b in pairs], n_averaged)

    return update
