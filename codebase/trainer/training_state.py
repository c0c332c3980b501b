"""Checkpointing of :class:`trainer.extensible_trainer.ExtensibleTrainer`: what a checkpoint
holds and how a run (one process, DDP or DeepSpeed) continues from one exactly."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from trainer.config import Experiment
from utils import distributed
from utils.io import load_module
from utils.schema import ConfigError
from utils.seed import rng_state, set_rng_state, set_seed

log = logging.getLogger(__name__)
STATE_FORMAT = 1


class TrainingStateMixin:
    """``save`` and the loading half of resume; the trainer provides the attributes used."""

    def save(self) -> Path | None:
        """Write a checkpoint: engine files (every rank), then networks, EMA copies and the
        training state (rank 0), the state last so that only complete checkpoints count."""
        self.engine.save_checkpoint(self.checkpoints.engine_dir(self.step, self.engine.name))
        rngs = distributed.all_gather_object(rng_state())  # ranks draw different numbers
        distributed.barrier()  # every rank's engine files are written
        path = None
        if self.dist.is_main:
            nets = {n: (net, self.exp.network_specs[n].which_model, self.exp.network_specs[n].kwargs)
                    for n, net in self.raw_networks.items()}
            owned = self.engine.owns_optimizer_state
            state = {
                "format_version": STATE_FORMAT, "step": self.step, "seed": self.seed,
                "skipped_steps": self.skipped_steps,
                "engine_name": self.engine.name, "world_size": self.dist.world_size,
                "optimizers": {} if owned else {n: s.optimizer.state_dict()
                                                for n, s in self.steps.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                "engine": self.engine.state_dict(),
                "loader": self.loader.state_dict(),
                "ema_n_averaged": {n: int(e.n_averaged) for n, e in self.ema.items()},
                "rng": rngs[0],
                "rng_per_rank": rngs,
                "config": yaml.safe_dump(self.exp.raw, sort_keys=False),
            }
            path = self.checkpoints.save(self.step, nets, state,
                                         ema={n: e.module for n, e in self.ema.items()},
                                         metadata=self.checkpoint_metadata)
            self.logger.info(f"saved checkpoint at step {self.step}: {path}")
        distributed.barrier()
        return path

    def _load_network_weights(self, path: Path, step: int, state: dict) -> None:
        for name, net in self.raw_networks.items():
            load_module(net, self.checkpoints.network_path(step, name), strict=True)
        for name, ema in self.ema.items():
            ema_path = self.checkpoints.network_path(step, name, ema=True)
            if ema_path.exists():
                load_module(ema.module, ema_path, strict=True)
                ema.n_averaged.fill_(state.get("ema_n_averaged", {}).get(name, 1))
            else:
                log.warning("no EMA weights for %s in %s; restarting its average", name, path)

    def _load_training_state(self, path: Path, state: dict) -> None:
        """Everything but the network weights (loaded before the engine wrapped them)."""
        step = int(state["step"])
        for name, step_obj in self.steps.items():
            if not self.engine.owns_optimizer_state:
                if name in state["optimizers"]:
                    step_obj.optimizer.load_state_dict(state["optimizers"][name])
                else:
                    log.warning("%s has no optimizer state for step %r (written by engine %r); "
                                "the optimizer starts fresh", path, name,
                                state.get("engine_name", "local"))
            if name in state["schedulers"]:
                self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.engine.load_state_dict(state.get("engine", {}))
        self.engine.load_checkpoint(self.checkpoints.engine_dir(step, self.engine.name))
        self.loader.load_state_dict(state["loader"])
        self.step = step
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rngs = state.get("rng_per_rank") or [state["rng"]]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:  # another world size: rank 0 continues its stream, the others start new ones
            log.warning("%s was written by %d rank(s), this run has %d: the data order and the "
                        "random streams of ranks > 0 differ from an uninterrupted run",
                        path, len(rngs), self.dist.world_size)
            set_rng_state(rngs[0])
            if self.dist.rank > 0:
                set_seed(rank_seed(self.seed + step, self.dist.rank))

    def _load_pretrained(self) -> None:
        for name, path in self.exp.path_opts.pretrain.items():
            report = load_module(self.raw_networks[name], path, strict=self.exp.path_opts.strict_load)
            for ema_name, ema in self.ema.items():
                if ema_name == name:
                    ema.module.load_state_dict(self.raw_networks[name].state_dict())
            msg = f"initialised {name} from {path}"
            log.warning("%s:\n%s", msg, report.describe()) if not report.ok else log.info(msg)


def per_rank_batch_size(exp: Experiment, phase: str, world: int) -> int | None:
    """``datasets.<phase>.batch_size`` is the global batch; one rank loads its 1/world share."""
    spec = exp.dataset_specs.get(phase)
    if spec is None or spec.batch_size is None or world == 1:
        return spec.batch_size if spec else None
    if spec.batch_size % world:
        raise ConfigError([(f"datasets.{phase}.batch_size",
                            f"{spec.batch_size} is the global batch and must be divisible by the "
                            f"{world} ranks; use a multiple of {world}")], exp.file)
    return spec.batch_size // world


def rank_seed(seed: int, rank: int) -> int:
    """A different, reproducible seed for each rank > 0 (dropout, augmentation)."""
    return (seed + 1_000_003 * rank) % 2**32
