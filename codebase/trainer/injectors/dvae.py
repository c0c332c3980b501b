"""``discrete_token``: mel -> DVAE codes with a frozen, pretrained DVAE (DLAS's
DiscreteTokenInjector, which Tortoise's GPT recipe uses to make its mel-code targets).

The DVAE is described by a DLAS network YAML, as DLAS ships it
(``train_diffusion_vocoder_22k_level.yml``)::

    path:
      pretrain_model_dvae: ../experiments/dvae.pth   # relative to this YAML's folder
    networks:
      dvae: {type: generator, which_model_G: lucidrains_dvae, kwargs: {channels: 80, ...}}

or by the experiment YAML that trained it here: without ``path.pretrain_model_dvae`` the weights
are those of the newest intact checkpoint of that experiment's run (its EMA copy if any), built
with the kwargs stored in that checkpoint (which include any ``-o`` override of the run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models.audio.tts  # noqa: F401 - registers lucidrains_dvae
from models import MODELS
from trainer.checkpoint import CheckpointManager
from trainer.component import ComponentSpec, TrainerEnv
from trainer.injectors.base import Injector
from utils.errors import UserError
from utils.io import (
    adapted,
    compare_weights,
    load_module,
    read_network_metadata,
    weight_shapes,
)
from utils.options import parse_yaml
from utils.registry import did_you_mean
from utils.schema import Problems, Runtime, bind_options

DEFAULT_DVAE_CONFIG = Path("../experiments/train_diffusion_vocoder_22k_level.yml")  # DLAS's


@dataclass
class DvaeSource:
    """A network of a DLAS network YAML: what to build and the weights to load."""

    name: str
    which_model: str
    kwargs: dict[str, Any]
    weights: Path


def read_dvae_config(config: Path, name: str | None) -> DvaeSource:
    """Read ``networks.<name>`` and ``path.pretrain_model_<name>`` of a DLAS network YAML
    (``name`` None: ``dvae`` if present, else the first network). Raises ValueError saying
    what is wrong with the file."""
    config = Path(config)
    if not config.is_file():
        raise ValueError(
            f"DVAE config {config} does not exist; point dvae_config at a DLAS network YAML "
            f"(networks.<name> and path.pretrain_model_<name>), relative to the experiment"
        )
    doc = parse_yaml(config.read_text(), str(config))  # ConfigError names the file and key
    networks = (doc or {}).get("networks") if isinstance(doc, dict) else None
    if not isinstance(networks, dict) or not networks:
        raise ValueError(f"DVAE config {config} has no `networks` section")
    if name is None:
        name = "dvae" if "dvae" in networks else next(iter(networks))
    if name not in networks:
        raise ValueError(
            f"DVAE config {config} has no network {name!r}{did_you_mean(name, networks)} "
            f"(networks: {', '.join(networks)}); set dvae_name"
        )
    net = networks[name] or {}
    which = [net[k] for k in ("which_model_G", "which_model") if k in net]
    if len(which) != 1:
        raise ValueError(f"DVAE config {config}: networks.{name} needs which_model_G")
    paths = doc.get("path") or {}
    weights = paths.get(f"pretrain_model_{name}")
    if not weights:
        # the run's own checkpoint: its metadata holds the kwargs it was really trained with
        # (a `-o networks.dvae.kwargs...` override is not in the YAML)
        weights = trained_weights(config, doc, name)
        try:
            meta = read_network_metadata(weights)
        except UserError as e:
            raise ValueError(str(e)) from e
        return DvaeSource(name, meta["which_model"], dict(meta["kwargs"]), weights)
    weights = Path(weights).expanduser()
    if not weights.is_absolute():
        weights = config.parent / weights
    if not weights.is_file():
        raise ValueError(
            f"DVAE weights {weights} (path.pretrain_model_{name} of {config}) do not exist; "
            f"download the DVAE (Tortoise's dvae.pth) or train one"
        )
    return DvaeSource(name, which[0], dict(net.get("kwargs") or {}), weights)


def trained_weights(config: Path, doc: dict, name: str) -> Path:
    """The weights of network ``name`` from the newest intact checkpoint of the run that the
    experiment YAML ``config`` trains (its EMA copy when there is one): how a GPT recipe points
    at a DVAE trained here. Raises ValueError saying how to get a checkpoint."""
    root = (doc.get("path") or {}).get("root")
    run = Path(root).expanduser() if root else Path(doc.get("name") or "")
    if not run.is_absolute():
        run = config.parent / run
    if not doc.get("name") and not root:
        raise ValueError(
            f"DVAE config {config}: path.pretrain_model_{name} is not set and the file is not an "
            f"experiment (no `name`) whose run could hold trained weights; set "
            f"path.pretrain_model_{name} to the DVAE's weights"
        )
    checkpoints = CheckpointManager(run)
    state, _, damaged = checkpoints.newest_intact() if run.is_dir() else (None, None, [])
    if state is None:
        bad = f" ({len(damaged)} damaged checkpoint(s))" if damaged else ""
        raise ValueError(
            f"DVAE config {config} sets no path.pretrain_model_{name}, so its weights come from "
            f"its run {run}, which has no intact checkpoint yet{bad}; train the DVAE first "
            f"(python train.py -opt {config}) or set path.pretrain_model_{name}"
        )
    step = int(state.stem)
    ema = checkpoints.network_path(step, name, ema=True)
    weights = ema if ema.is_file() else checkpoints.network_path(step, name)
    if not weights.is_file():
        raise ValueError(
            f"DVAE config {config}: the checkpoint of step {step} in {run} has no network "
            f"{name!r} ({weights.name}); set dvae_name to the DVAE's network name"
        )
    return weights


def build_dvae(source: DvaeSource, device: torch.device | str = "cpu") -> nn.Module:
    """The DVAE with its weights loaded strictly, on ``device``, frozen and in eval mode."""
    factory = MODELS.get(source.which_model)
    with torch.device(device):
        net = factory(**source.kwargs)
    try:
        load_module(net, source.weights, strict=True)
    except UserError as e:  # a file that does not fit the config is the config's problem
        raise ValueError(str(e)) from e
    return net.eval().requires_grad_(False)


def check_dvae_weights(source: DvaeSource) -> None:
    """Raise ValueError when the weights file's keys or shapes differ from the network's
    (compared against a weightless meta-device copy; nothing is allocated)."""
    with torch.device("meta"):
        net = MODELS.get(source.which_model)(**source.kwargs)
    try:
        report = compare_weights(net, adapted(net, weight_shapes(source.weights)))
    except UserError as e:
        raise ValueError(str(e)) from e
    if not report.ok:
        raise ValueError(
            f"DVAE weights {source.weights} do not match networks.{source.name} "
            f"({source.which_model}, kwargs {source.kwargs}):\n{report.describe(limit=8)}\n"
            f"Fix the kwargs in the DVAE config to match the file, or point it at the right file"
        )


class DiscreteTokenInjector(Injector):
    """mel [B, C, F] -> codes [B, F'] int64 with a frozen pretrained DVAE (``lucidrains_dvae``
    with ``num_layers`` stride-2 layers: F' = ceil(F / 4) for Tortoise's).

    The DVAE is built once on the trainer's device, runs in eval mode under no_grad outside
    autocast, and is kept outside this module's children, so it is never trained, moved or
    saved with the run.

    Args:
        dvae_config: DLAS network YAML with ``networks.<name>`` and
            ``path.pretrain_model_<name>`` (paths in it are relative to its own folder).
        dvae_name: the network in that YAML (default: ``dvae`` if present, else the first).
    """

    def __init__(
        self,
        env: Runtime[TrainerEnv],
        dvae_config: Path = DEFAULT_DVAE_CONFIG,
        dvae_name: str | None = None,
    ) -> None:
        super().__init__()
        self.device = torch.device(env.device)
        source = read_dvae_config(dvae_config, dvae_name)
        self.source = source
        # object.__setattr__: not a child module, so not in state_dict(), .to() or .train()
        object.__setattr__(self, "dvae", build_dvae(source, self.device))

    @classmethod
    def check_options(cls, options: dict, path: str, problems: Problems, base_dir: Path) -> dict:
        kwargs = super().check_options(options, path, problems, base_dir)
        config = kwargs.get("dvae_config", base_dir / DEFAULT_DVAE_CONFIG)
        try:
            source = read_dvae_config(config, kwargs.get("dvae_name"))
            factory = MODELS.get(source.which_model)
        except (ValueError, KeyError) as e:
            problems.add(f"{path}.dvae_config", str(e).strip("'\""))
            return kwargs
        own = Problems()
        source.kwargs = bind_options(factory, source.kwargs, f"networks.{source.name}.kwargs", own)
        for where, message in own.items:
            problems.add(f"{path}.dvae_config", f"{config}: {where}: {message}")
        if own:
            return kwargs
        try:  # keys and shapes against a weightless (meta) copy: caught by --dry-run
            check_dvae_weights(source)
        except (ValueError, TypeError) as e:
            problems.add(f"{path}.dvae_config", str(e))
        return kwargs

    def configure(self, spec: ComponentSpec) -> None:
        super().configure(spec)
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ValueError(
                f"discrete_token: `in` is one mel key and `out` one codes key "
                f"(got in={self.inputs}, out={self.outputs})"
            )

    def checkpoint_metadata(self) -> dict[str, str]:
        """The DVAE (model, kwargs, absolute weights path), for decoding a checkpoint's codes
        at inference (:class:`models.audio.tts.synthesis.TortoiseSynthesizer`)."""
        source = self.source
        return {
            "dvae": json.dumps(
                {
                    "which_model": source.which_model,
                    "kwargs": source.kwargs,
                    "weights": str(Path(source.weights).resolve()),
                }
            )
        }

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        mel = state[self.input]
        channels = self.dvae.channels
        if mel.dim() != 3 or mel.shape[1] != channels:
            raise ValueError(
                f"{getattr(self, 'path', 'discrete_token')}: input {self.input!r} must be a "
                f"mel [B, {channels}, frames] (the DVAE's channels), got {list(mel.shape)}"
            )
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            codes = self.dvae.get_codebook_indices(mel.to(self.device, torch.float32))
        return {self.output: codes}  # [B, F'] int64
