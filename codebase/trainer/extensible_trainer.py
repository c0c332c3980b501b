"""ExtensibleTrainer: builds a validated experiment and runs its named steps."""
from __future__ import annotations

import inspect
import random
import time
import warnings
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data.loader import TrainLoader, batch_size_of, collate_fn_of, eval_loader, make_batch_sampler, split_batch
from trainer.checkpoint import CheckpointManager
from trainer.commands import CommandListener, GracefulInterrupt
from trainer.component import TrainerEnv, build_component
from trainer.config import Experiment
from trainer.engines import build_engine, resolve_device
from trainer.logger import TrainingLogger
from trainer.lr_scheduler import build_scheduler
from trainer.metrics import Meter
from trainer.optimizers import build_optimizer
from trainer.steps import ConfigurableStep, check_state_keys
from trainer.training_state import TrainingStateMixin, per_rank_batch_size, rank_seed
from utils import distributed
from utils.schema import Problems
from utils.seed import set_seed


class ExtensibleTrainer(TrainingStateMixin):
    """Trains the networks of one experiment through its steps, with checkpoints and logs."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.train_opts = exp.train_opts
        self.dist = distributed.init_distributed(resolve_device(exp.device, distributed.DistInfo(0, 0, 1)).type)
        self.device = resolve_device(exp.device, self.dist)
        seed = exp.seed if exp.seed is not None else random.SystemRandom().randrange(2**31)
        # One seed for all ranks: their data shares are slices of one shuffled order.
        self.seed = distributed.broadcast_object(seed)
        set_seed(self.seed)
        self.run_dir = exp.run_dir
        self.checkpoints = CheckpointManager(self.run_dir, exp.logger_opts.keep_last)
        self.step = 0
        self.skipped_steps = 0
        self._window_skips: dict[str, int] = {}  # skipped updates per step since the last log
        self.step_callbacks: list[Callable[[int, dict[str, Any]], None]] = []

        train_spec = exp.dataset_specs["train"]
        batch_size = per_rank_batch_size(exp, "train", self.dist.world_size)  # before any data
        self.val_batch_size = per_rank_batch_size(exp, "val", self.dist.world_size)
        self.datasets = {phase: self._build_dataset(phase, spec)
                         for phase, spec in exp.dataset_specs.items()}
        # e.g. the phoneme vocabulary and codec of the training data, for inference
        get_metadata = getattr(self.datasets["train"], "checkpoint_metadata", None)
        self.checkpoint_metadata: dict[str, str] = get_metadata() if get_metadata else {}
        self._check_state_keys()
        self.engine = build_engine(exp, self.device, self.dist, batch_size)
        self._build_networks()
        # Every rank checks (a bad path fails everywhere, not in one rank while the others
        # wait); rank 0's choice is taken, so all resume from the same checkpoint.
        resume = self.checkpoints.resolve_resume(exp.path_opts.resume_state)
        resume = distributed.broadcast_object(resume)
        state = self.checkpoints.load_state(resume) if resume is not None else None
        # Weights go in before the engine wraps the networks: DDP broadcasts them and
        # DeepSpeed copies them into its optimizer.
        if state is not None:
            self._load_network_weights(resume, int(state["step"]), state)
        else:
            self._load_pretrained()
        if self.dist.rank > 0:  # after building the networks, whose init must match everywhere
            set_seed(rank_seed(self.seed, self.dist.rank))
        self.env = TrainerEnv(device=self.device, run_dir=self.run_dir, precision=exp.precision)
        runtime: dict[str, Any] = {"networks": self.networks, "env": self.env}
        runtime["runtime"] = runtime
        self.steps = self._build_steps(runtime)
        self.schedulers = {name: build_scheduler(exp.train_opts.default_lr_scheme, s.optimizer,
                                                 exp.train_opts.niter, exp.scheduler_kwargs,
                                                 "train.default_lr_scheme")
                           for name, s in self.steps.items()}
        sampler = make_batch_sampler(self.datasets["train"], batch_size,
                                     _default(train_spec.shuffle, True), self.seed,
                                     _default(train_spec.drop_last, True), self.dist.rank,
                                     self.dist.world_size)
        self.loader = TrainLoader(self.datasets["train"], sampler, train_spec.n_workers,
                                  pin_memory=self.device.type == "cuda",
                                  seed=self.seed + self.dist.rank)
        eval_runtime = {**runtime, "networks": self.eval_networks(), "datasets": self.datasets}
        self._eval_runtime = eval_runtime
        self.evaluators = []

        if state is not None:
            self._load_training_state(resume, state)
        self.logger = TrainingLogger(
            self.run_dir, name=exp.name, total_steps=exp.train_opts.niter, start_step=self.step,
            print_freq=exp.logger_opts.print_freq, use_tb=exp.use_tb_logger, wandb=exp.wandb,
            wandb_project=exp.logger_opts.wandb_project, wandb_mode=exp.logger_opts.wandb_mode,
            config=exp.raw, enabled=self.dist.is_main, progress=exp.logger_opts.progress_bar)
        eval_runtime["logger"] = self.logger
        self.evaluators = [build_component(spec, eval_runtime) for spec in exp.evaluator_specs]
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yml").write_text(yaml.safe_dump(exp.raw, sort_keys=False))
        ranks = (f"; {self.dist.world_size} ranks, {batch_size} items each per step"
                 if self.dist.world_size > 1 else "")
        self.logger.info(f"run folder {self.run_dir}; seed {self.seed}; device {self.device}; "
                         f"precision {exp.precision}; engine {self.engine.name}{ranks}"
                         + (f"; resumed from {resume} at step {self.step}" if resume else ""))

    # ----------------------------------------------------------------------------- building
    def _build_dataset(self, phase: str, spec: Any) -> Any:
        kwargs = dict(spec.kwargs)
        if "phase" in inspect.signature(spec.cls).parameters:
            kwargs["phase"] = spec.phase or phase
        dataset = spec.cls(**kwargs)
        if len(dataset) == 0:
            raise ValueError(f"datasets.{phase}: the dataset ({spec.cls.__name__}) has no items")
        return dataset

    def _check_state_keys(self) -> None:
        dataset = self.datasets["train"]
        keys = getattr(dataset, "batch_keys", None)
        if keys is None:
            sample = collate_fn_of(dataset)([dataset[0]])
            keys = list(sample) if isinstance(sample, dict) else []
        problems = Problems()
        check_state_keys(self.exp.step_specs, keys, problems)
        problems.raise_if_any(self.exp.file)

    def _build_networks(self) -> None:
        """Build every network on the device (unwrapped; the engine wraps the trained ones)."""
        self.raw_networks: dict[str, nn.Module] = {}
        self.networks: dict[str, nn.Module] = {}
        self.ema: dict[str, AveragedModel] = {}
        for name, spec in self.exp.network_specs.items():
            kwargs = dict(spec.kwargs)
            params = inspect.signature(spec.factory).parameters
            if "checkpointing" in params and "checkpointing" not in kwargs:
                kwargs["checkpointing"] = self.exp.checkpointing_enabled
            net = spec.factory(**kwargs)
            if not isinstance(net, nn.Module):
                raise TypeError(f"networks.{name}: model {spec.which_model!r} returned "
                                f"{type(net).__name__}, not a torch.nn.Module")
            net.requires_grad_(spec.trainable)
            self.raw_networks[name] = self.networks[name] = net.to(self.device)
            if spec.trainable and self.train_opts.ema_rate:
                self.ema[name] = AveragedModel(
                    net, multi_avg_fn=get_ema_multi_avg_fn(self.train_opts.ema_rate),
                    use_buffers=True)

    def _build_steps(self, runtime: dict[str, Any]) -> dict[str, ConfigurableStep]:
        """Optimizers first, then the engine wraps each trainable network with its optimizer,
        then the injectors and losses (which call the wrapped networks)."""
        optimizers, trained_by = {}, {}
        for name, spec in self.exp.step_specs.items():
            if not self.exp.network_specs[spec.training].trainable:
                raise ValueError(f"steps.{name}.training: network {spec.training!r} has "
                                 "trainable: false")
            optimizers[name] = build_optimizer(spec.optimizer, self.raw_networks[spec.training],
                                               spec.optimizer_params, f"steps.{name}.optimizer")
            trained_by.setdefault(spec.training, name)
        for net_name, net_spec in self.exp.network_specs.items():
            if net_spec.trainable:
                step = trained_by.get(net_name)
                clip = self.exp.step_specs[step].clip_grad_eps if step else None
                self.networks[net_name] = self.engine.prepare(
                    net_name, self.raw_networks[net_name], optimizers.get(step), clip)
        steps = {}
        for name, spec in self.exp.step_specs.items():
            injectors = [build_component(c, runtime).to(self.device) for c in spec.injector_specs]
            losses = [build_component(c, runtime).to(self.device) for c in spec.loss_specs]
            steps[name] = ConfigurableStep(name, spec, self.networks[spec.training],
                                           optimizers[name], injectors, losses, self.engine)
        return steps

    def eval_networks(self) -> dict[str, nn.Module]:
        """Networks for evaluators: the EMA copy where there is one."""
        return {n: (self.ema[n].module if n in self.ema else net)
                for n, net in self.raw_networks.items()}

    # ----------------------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step of every step whose gate is open on this batch."""
        batch = _to_device(batch, self.device)
        chunks = split_batch(batch, self.train_opts.mega_batch_factor)
        logs: dict[str, torch.Tensor] = {}
        total = None
        multi = len(self.steps) > 1
        for name, step in self.steps.items():
            if not step.gate.open(self.step):
                continue
            if multi:  # only this step's network collects gradients
                for other, net in self.raw_networks.items():
                    net.requires_grad_(other == step.spec.training and
                                       self.exp.network_specs[other].trainable)
            out, skipped = step.train(chunks, self.step)
            step_total = out.pop("_total", None)
            if step_total is not None:
                total = step_total if total is None else total + step_total
            logs.update(out)
            if multi:  # later steps see this step's outputs, not its graph
                for state in chunks:
                    for k, v in state.items():
                        if isinstance(v, torch.Tensor) and v.requires_grad:
                            state[k] = v.detach()
            if skipped:
                self.skipped_steps += 1
                self._window_skips[name] = self._window_skips.get(name, 0) + 1
        if total is not None:
            logs["loss/total"] = total
        with warnings.catch_warnings():
            # GradScaler skipping an overflowing fp16 step makes torch warn that the scheduler
            # stepped first; our schedules are functions of the step number, so that is intended.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for sched in self.schedulers.values():
                sched.step()
        for name, ema in self.ema.items():
            ema.update_parameters(self.raw_networks[name])
        return logs

    def train(self) -> None:
        """Run until ``train.niter`` steps, a ``quit`` command or Ctrl-C; save at the end."""
        opts, lopts, niter = self.train_opts, self.exp.logger_opts, self.train_opts.niter
        listener = CommandListener(on_message=self.logger.info)
        if lopts.stdin_commands and self.dist.is_main:
            listener.start()
        meter, saved_at = Meter(), self.step  # a resumed state is already saved
        if self.step >= niter:
            self.logger.info(f"nothing to do: at step {self.step} of train.niter {niter} "
                             f"(raise it with -o train.niter=N to continue)")
        if self.step == 0 and self.exp.eval_opts.at_start and niter > 0:
            if opts.val_freq:
                self.validate()
            self.run_evaluators()
        self._set_train_mode(True)
        try:
            with GracefulInterrupt(on_signal=lambda s: self.logger.info(
                    "interrupted: saving a checkpoint after this step (again to abort)")) as stop:
                # All ranks stop at the same step, whichever of them got the signal first.
                while self.step < niter and not distributed.any_rank(stop.requested):
                    t0 = time.perf_counter()
                    batch = next(self.loader)
                    data_time = time.perf_counter() - t0
                    self.step += 1
                    self.env.step = self.step
                    logs = self.train_step(batch)
                    meter.add(logs, batch_size_of(batch), data_time)
                    self.logger.progress(self.step)
                    for callback in self.step_callbacks:
                        callback(self.step, logs)
                    if self.step % lopts.print_freq == 0 or self.step == niter:
                        self._log_train(meter)
                        meter.reset()
                    commands = self._poll(listener)
                    if (opts.val_freq and self.step % opts.val_freq == 0) or "eval" in commands:
                        self.validate()
                    if (self.exp.eval_opts.every and self.step % self.exp.eval_opts.every == 0
                            or "eval" in commands):
                        self.run_evaluators()
                    if ((lopts.save_checkpoint_freq and self.step % lopts.save_checkpoint_freq == 0)
                            or "save" in commands):
                        self.save()
                        saved_at = self.step
                    if "quit" in commands:
                        self.logger.info("quit: saving and stopping")
                        break
            if saved_at != self.step:
                self.save()
        finally:
            listener.stop()
            self.logger.close()

    def evaluate(self) -> dict[str, float]:
        """Validation and every evaluator on the current weights, without training."""
        try:
            results = self.validate()
            results.update(self.run_evaluators())
        finally:
            self.logger.close()
        return results

    def _poll(self, listener: CommandListener) -> set[str]:
        if self.dist.world_size == 1:
            return set(listener.poll())
        if self.step % self.exp.logger_opts.print_freq:  # a collective every step would cost
            return set()
        return set(distributed.broadcast_object(listener.poll()))

    def _log_train(self, meter: Meter) -> None:
        scalars = distributed.all_reduce_mean(meter.summary())
        for key in [k for k in scalars if k.endswith("_per_sec")]:
            scalars[key] *= self.dist.world_size  # throughput of the whole job, not one rank
        for name, step in self.steps.items():
            scalars[f"lr/{name}"] = step.optimizer.param_groups[0]["lr"]
            scalars[f"skipped/{name}"] = self._window_skips.get(name, 0)
            for loss in step.losses:  # weighted values are derived here, not every step
                raw = scalars.get(f"loss/{loss.component_name}")
                if raw is not None:
                    scalars[f"loss/{loss.component_name}_weighted"] = raw * loss.weight
        self._window_skips.clear()
        scalars["train/skipped_steps"] = self.skipped_steps
        scalars["train/epoch"] = self.loader.epoch
        self.logger.log_scalars(self.step, scalars)
        self.logger.console(self.step, {k: v for k, v in scalars.items() if _on_console(k, v)})

    def _set_train_mode(self, training: bool) -> None:
        for net in self.networks.values():
            net.train(training)
        for step in self.steps.values():
            for comp in [*step.injectors, *step.losses]:
                comp.train(training)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean of every loss over the val dataset (injectors in eval mode), as ``val/<loss>``."""
        if "val" not in self.datasets:
            return {}
        spec = self.exp.dataset_specs["val"]
        self._set_train_mode(False)
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in eval_loader(self.datasets["val"], self.val_batch_size, spec.n_workers,
                                     self.dist.rank, self.dist.world_size):
                batch = _to_device(batch, self.device)
                n = batch_size_of(batch)
                for chunk in split_batch(batch, self.train_opts.mega_batch_factor):
                    m = batch_size_of(chunk)
                    for step in self.steps.values():
                        for k, v in step.evaluate(chunk, self.step).items():
                            sums[k] = sums.get(k, 0.0) + float(v) * m
                count += n
        finally:
            self._set_train_mode(True)
        results = {f"val/{k}": v / max(count, 1) for k, v in sums.items()}
        results = distributed.all_reduce_mean(results)
        self.logger.log_scalars(self.step, results)
        self.logger.info("validation at step %d: %s" % (self.step, ", ".join(
            f"{k} {v:.4g}" for k, v in results.items())))
        return results

    def run_evaluators(self) -> dict[str, float]:
        """Run every evaluator (rank 0 only) and log its scalars under ``eval/``."""
        results: dict[str, float] = {}
        if not self.evaluators or not self.dist.is_main:
            return results
        self._set_train_mode(False)
        try:
            for ev in self.evaluators:
                with torch.no_grad():
                    for k, v in ev.evaluate(self.step).items():
                        results[f"eval/{k}"] = float(v)
        finally:
            self._set_train_mode(True)
        self.logger.log_scalars(self.step, results)
        return results


def _on_console(key: str, value: float) -> bool:
    """The console line shows raw losses, lr, grad norm and throughput; TensorBoard has all."""
    if key.startswith(("loss/", "grad_norm/", "lr/")):
        return not key.endswith("_weighted")
    if key.startswith(("skipped/", "train/skipped")):
        return value > 0
    return key in ("perf/samples_per_sec", "train/epoch")


def _default(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch
