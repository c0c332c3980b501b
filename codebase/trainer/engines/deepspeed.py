"""DeepSpeed: ZeRO stage 0-2 data parallelism, one DeepSpeed engine per trained network.

Launched with ``deepspeed train.py -opt FILE``, ``torchrun ... train.py -opt FILE`` or plain
``python train.py`` (one process). The trainer keeps doing what it does for the local engine:
it builds the torch optimizer and LR schedule, splits the batch into micro-batches and weights
their losses; DeepSpeed gets ``gradient_accumulation_steps: 1`` and an explicit accumulation
boundary on the last micro-batch, so it reduces gradients once and steps once per update.

Weights stay fp32 (bf16/fp16 run through DeepSpeed's ``torch_autocast``, like the local
engine's autocast), so saved networks, EMA copies and evaluators work unchanged; for ZeRO
stage <= 2 every rank holds the full parameters. DeepSpeed's own checkpoint (optimizer
shards, loss scale, counters) goes into ``training_state/<step>.deepspeed/<network>/``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from trainer.engines.base import NULL_CONTEXT, Engine
from utils import distributed
from utils.distributed import DistInfo
from utils.schema import Problems, build_dataclass

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[deepspeed]"'
ZERO_STAGES = (0, 1, 2)
# DeepSpeed config keys the trainer derives from the experiment: where to set them instead.
OWNED_KEYS = {
    "train_batch_size": "datasets.train.batch_size",
    "train_micro_batch_size_per_gpu": "datasets.train.batch_size",
    "gradient_accumulation_steps": "train.mega_batch_factor",
    "gradient_clipping": "steps.<name>.clip_grad_eps",
    "optimizer": "steps.<name>.optimizer and optimizer_params",
    "scheduler": "train.default_lr_scheme",
    "fp16": "precision",
    "bf16": "precision",
    "torch_autocast": "precision",
    "amp": "precision",
}
_TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass
class DeepSpeedOptions:
    """``deepspeed:`` section, read when ``engine: deepspeed``."""

    # 0: plain data parallel; 1: + optimizer states sharded over ranks; 2: + gradients sharded.
    # Stage 3 (sharded parameters) is not offered: saving networks and EMA need full weights.
    zero_stage: int = 2
    # Raw DeepSpeed config merged (recursively) over the generated one, e.g.
    # {zero_optimization: {overlap_comm: true, offload_optimizer: {device: cpu}}}.
    config: dict = field(default_factory=dict)


def validate_options(section: dict, exp: Any, problems: Problems) -> DeepSpeedOptions | None:
    """Check ``deepspeed:`` against the rest of the validated experiment; problems are
    reported, not raised."""
    opts = build_dataclass(DeepSpeedOptions, section, "deepspeed", problems, exp.base_dir)
    if importlib.util.find_spec("deepspeed") is None:
        problems.add("engine", f"engine 'deepspeed' needs the deepspeed package: {INSTALL_HINT}")
    if opts is None:
        return None
    if opts.zero_stage not in ZERO_STAGES:
        problems.add(
            "deepspeed.zero_stage",
            f"must be one of {', '.join(map(str, ZERO_STAGES))}, "
            f"got {opts.zero_stage} (stage 3 shards the parameters, which saving "
            "networks and EMA copies do not support)",
        )
    for key, where in OWNED_KEYS.items():
        if key in opts.config:
            problems.add(f"deepspeed.config.{key}", f"is set by the trainer; set {where} instead")
    zero = opts.config.get("zero_optimization", {})
    if isinstance(zero, dict) and "stage" in zero:
        problems.add("deepspeed.config.zero_optimization.stage", "set deepspeed.zero_stage instead")
    if exp.precision == "fp16" and opts.zero_stage > 0:
        # DeepSpeed (0.19) leaves torch-autocast fp16 gradients scaled under ZeRO.
        problems.add(
            "precision",
            "fp16 with engine 'deepspeed' works with deepspeed.zero_stage 0 "
            "only; use precision bf16 (or zero_stage 0)",
        )
    trained: dict[str, str] = {}
    for name, step in exp.steps.items():
        net = step.training if step is not None else None
        if net is not None and net in trained:
            problems.add(
                f"steps.{name}.training",
                f"network {net!r} is already trained by "
                f"steps.{trained[net]}; engine 'deepspeed' needs one step (one "
                "optimizer) per network",
            )
        trained.setdefault(net, name)
    return opts


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in; nested mappings merge, other values replace."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def build_config(
    opts: DeepSpeedOptions, precision: str, micro_batch: int, world_size: int, clip: float | None
) -> dict:
    """The DeepSpeed config of one network's engine."""
    config: dict[str, Any] = {
        # The trainer hands DeepSpeed one micro-batch per update (it accumulates itself with
        # an explicit boundary), so DeepSpeed's own accumulation stays at 1.
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {"stage": opts.zero_stage},
        "gradient_clipping": float(clip or 0.0),
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if precision in _TORCH_DTYPE_NAMES:
        config["torch_autocast"] = {"enabled": True, "dtype": _TORCH_DTYPE_NAMES[precision]}
    return deep_merge(config, opts.config)


def import_deepspeed(device: torch.device) -> Any:
    """Import deepspeed with its accelerator matching ``device``.

    DeepSpeed picks its accelerator once, at import; set ``DS_ACCELERATOR`` first so that
    ``device: cpu`` on a GPU machine (or a CPU-only machine) does not surprise it.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise ImportError(
            f"engine 'deepspeed' needs the deepspeed package ({e}): {INSTALL_HINT}"
        ) from e
    accel = get_accelerator().device_name()
    if accel != device.type:
        raise RuntimeError(
            f"DeepSpeed runs on {accel!r} but the experiment's device is "
            f"{str(device)!r}; set DS_ACCELERATOR={device.type} (or the `device` "
            "option) so they agree"
        )
    return deepspeed


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed always needs a process group; make a one-process one when not launched."""
    if distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # read by DeepSpeed's start-up checks
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A HashStore needs no port: nothing else joins a one-process group.
    torch.distributed.init_process_group(
        backend, store=torch.distributed.HashStore(), rank=0, world_size=1
    )


class DeepSpeedEngine(Engine):
    """Wraps each trained network (with its optimizer) in a ``deepspeed.DeepSpeedEngine``."""

    name = "deepspeed"
    owns_optimizer_state = True

    def __init__(
        self,
        device: torch.device,
        precision: str,
        dist: DistInfo,
        options: DeepSpeedOptions,
        micro_batch: int | None,
    ) -> None:
        super().__init__(device, precision, dist)
        self.options = options
        self.micro_batch = micro_batch or 1  # token-budget batches: only used for DS's counters
        self.ds = import_deepspeed(device)
        ensure_process_group(device)
        self.engines: dict[str, Any] = {}  # network name -> deepspeed engine, in prepare order

    def prepare(
        self,
        name: str,
        net: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        clip: float | None = None,
    ) -> nn.Module:
        net = net.to(self.device)
        if optimizer is None:  # trainable but trained by no step: nothing for DeepSpeed to do
            return net
        config = build_config(
            self.options, self.precision, self.micro_batch, self.dist.world_size, clip
        )
        engine, _, _, _ = self.ds.initialize(model=net, optimizer=optimizer, config=config)
        self.engines[name] = engine
        return engine

    def no_sync(self, net: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
        """Mark the accumulation boundary: DeepSpeed reduces gradients on the last micro-batch.

        (``DeepSpeedEngine.no_sync`` refuses ZeRO stage 2; the boundary flag works for all.)
        """
        if hasattr(net, "set_gradient_accumulation_boundary"):
            net.set_gradient_accumulation_boundary(not skip_sync)
        return NULL_CONTEXT

    def backward(self, net: nn.Module, loss: torch.Tensor) -> None:
        net.backward(loss, scale_wrt_gas=False)  # micro-batch shares are already in the loss

    def step(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        clip: float | None,
    ) -> tuple[torch.Tensor, bool]:
        """DeepSpeed's step (clip, overflow check, update). Returns (norm, skipped)."""
        norm = None
        if net.zero_optimization_stage() == 0:
            # Stage 0 reports no norm and steps on non-finite gradients: check them here, as
            # the local engine does. Under fp16 the gradients are still loss-scaled.
            grads = [p.grad for p in net.module.parameters() if p.grad is not None]
            norm = nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
            scaler = getattr(net, "torch_autocast_z0_gradscaler", None)
            if scaler is not None:
                norm = norm / scaler.get_scale()
            elif not math.isfinite(norm.item()):
                net.zero_grad()
                return norm.detach(), True
        net.step()
        if norm is None:  # ZeRO computed it (a tensor on the device, or a float)
            value = net.get_global_grad_norm()
            norm = torch.as_tensor(
                float("nan") if value is None else value, dtype=torch.float32, device=self.device
            )
        return norm.detach(), not net.was_step_applied()

    def save_checkpoint(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(folder), tag=name, save_latest=False)

    def load_checkpoint(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            if not (folder / name).is_dir():  # e.g. a checkpoint of the local engine
                log.warning(
                    "no DeepSpeed checkpoint for network %r in %s: its weights are "
                    "loaded, its optimizer starts fresh",
                    name,
                    folder,
                )
                continue
            path, _ = engine.load_checkpoint(
                str(folder),
                tag=name,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {folder / name}")
