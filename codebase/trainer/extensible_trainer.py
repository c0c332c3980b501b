"""ExtensibleTrainer: builds a validated experiment and runs its named steps."""

from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data.loader import (
    TrainLoader,
    batch_size_of,
    collate_fn_of,
    eval_loader,
    make_batch_sampler,
    split_batch,
)
from data.spec import build_dataset
from trainer.best import BestTracker
from trainer.checkpoint import CheckpointManager
from trainer.commands import CommandListener, GracefulInterrupt
from trainer.compatibility import check_pretrained
from trainer.component import TrainerEnv, build_component
from trainer.config import Experiment, StepSpec
from trainer.engines import build_engine
from trainer.evaluators.base import scalar_prefix
from trainer.freeze import build_step_optimizer, describe, select_parameters
from trainer.logger import TrainingLogger, visual_image
from trainer.lora import LoraNetworks
from trainer.lr_scheduler import build_scheduler
from trainer.metrics import Meter
from trainer.oom import (
    BatchOutOfMemory,
    OutOfMemoryStreak,
    describe_batch,
    describe_failures,
    streak_message,
)
from trainer.steps import ConfigurableStep, check_state_keys
from trainer.training_state import (
    Counters,
    Group,
    RandomStreams,
    TrainingState,
    hyperparameters,
    option_changes,
    reapply_hyperparameters,
)
from utils import distributed
from utils.errors import EXIT_DIVERGED, CheckpointError
from utils.io import LoadReport, load_module
from utils.schema import ConfigError, Problems, construct
from utils.seed import derive_seed, set_seed

log = logging.getLogger(__name__)


class NonFiniteStreak(RuntimeError):
    """Too many optimizer steps in a row had a skipped (non-finite) update."""

    exit_code = EXIT_DIVERGED


class ExtensibleTrainer:
    """Trains the networks of one experiment through its steps, with checkpoints and logs.

    Built in named phases, in this order (each a method below): distributed setup and seed;
    data; networks and the engine; weights (resume or pretrained); steps and LR schedules;
    logging and evaluators; the training state a checkpoint holds; restoring it.
    """

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.step = 0
        self.step_callbacks: list[Callable[[int, dict[str, Any]], None]] = []
        self._window_skips: dict[str, int] = {}  # skipped updates per step since the last log
        self._streak = 0  # trainer steps in a row with a skipped update
        self._last_good: int | None = None  # newest checkpoint saved outside a streak
        self.stopped_early: str | None = None  # why train() stopped before train.niter
        self._oom_streak: list[str] = []  # the batches in a row that ran out of memory
        self._setup_distributed()
        self._build_data()
        self._build_networks()
        resume, saved = self._find_resume()
        self._load_weights(resume, saved)  # before the engine wraps the networks
        if self.dist.rank > 0:  # after building the networks, whose init must match everywhere
            set_seed(derive_seed(self.seed, self.dist.rank))
        self._build_steps()
        if saved is None:  # the data and features a pretrained network expects (not on resume)
            check_pretrained(self.exp.path.pretrain, self.checkpoint_metadata, self.exp.file)
        self._build_logging(start_step=int(saved["step"]) if saved else 0)
        self._remove_leftovers()
        self._register_state()
        if saved is not None:  # last: the random streams continue from here
            self._restore(resume, saved)
        self._write_run_config(resume)

    # ------------------------------------------------------------------------------ phases
    def _setup_distributed(self) -> None:
        """Process group, device and the run's seed (rank 0 picks it; every rank uses it, so
        their data shares are slices of one shuffled order)."""
        exp = self.exp
        self.dist = distributed.init_distributed(distributed.resolve_device(exp.device).type)
        self.device = distributed.resolve_device(exp.device, self.dist)
        seed = exp.seed if exp.seed is not None else random.SystemRandom().randrange(2**31)
        self.seed = distributed.broadcast_object(seed)
        set_seed(self.seed)
        self.run_dir = exp.run_dir
        self.checkpoints = CheckpointManager(self.run_dir, exp.logger.keep_last)
        self.env = TrainerEnv(device=self.device, run_dir=self.run_dir, precision=exp.precision)

    def _build_data(self) -> None:
        """Datasets, per-rank batch sizes, and the check that every step's state keys exist."""
        self.batch_size = self._per_rank_batch_size("train")  # before any data is read
        self.val_batch_size = self._per_rank_batch_size("val")
        self.datasets = {
            phase: build_dataset(spec, phase) for phase, spec in self.exp.datasets.items()
        }
        # e.g. the phoneme vocabulary and codec of the training data, for inference
        get_metadata = getattr(self.datasets["train"], "checkpoint_metadata", None)
        self.checkpoint_metadata: dict[str, str] = get_metadata() if get_metadata else {}
        dataset = self.datasets["train"]
        keys = getattr(dataset, "batch_keys", None)
        if keys is None:
            sample = collate_fn_of(dataset)([dataset[0]])
            keys = list(sample) if isinstance(sample, dict) else []
        problems = Problems()
        check_state_keys(self.exp.steps, keys, problems)
        problems.raise_if_any(self.exp.file)
        produced = set(keys) | {
            k for s in self.exp.steps.values() for inj in s.injectors for k in inj.outputs
        }
        for key in self.exp.logger.visuals:
            if key not in produced:
                log.warning(
                    "logger.visuals: no step produces state key %r (in a DLAS file it may come "
                    "from eval.injectors, which do not run here); it is not drawn",
                    key,
                )

    def _build_networks(self) -> None:
        """The engine, then every network on the device (unwrapped: the engine wraps the
        trained ones later). Their EMA copies are made once their weights are loaded."""
        self.engine = build_engine(self.exp, self.device, self.dist, self.batch_size)
        self.raw_networks: dict[str, nn.Module] = {}
        self.networks: dict[str, nn.Module] = {}
        self.ema: dict[str, AveragedModel] = {}
        self.lora = LoraNetworks(self.exp, self.checkpoints, self.dist.is_main)
        for name, spec in self.exp.networks.items():
            net = construct(
                spec.factory,
                spec.kwargs,
                {
                    "checkpointing": self.exp.checkpointing_enabled,
                    "checkpointing_enabled": self.exp.checkpointing_enabled,  # DLAS's name
                },
                f"networks.{name}",
            )
            if not isinstance(net, nn.Module):
                raise TypeError(
                    f"networks.{name}: model {spec.which_model!r} returned "
                    f"{type(net).__name__}, not a torch.nn.Module"
                )
            net.requires_grad_(spec.trainable)
            self.raw_networks[name] = self.networks[name] = net.to(self.device)

    def _build_ema(self) -> None:
        """An EMA copy of each trainable network when ``ema_rate`` is set (of a LoRA network:
        of its adapters, see :mod:`trainer.lora`)."""
        rate = self.exp.train.ema_rate
        for name, net in self.raw_networks.items():
            if not (self.exp.networks[name].trainable and rate):
                continue
            if name in self.lora.bases:
                self.ema[name] = self.lora.ema(net, rate)
            else:
                self.ema[name] = AveragedModel(
                    net, multi_avg_fn=get_ema_multi_avg_fn(rate), use_buffers=True
                )

    def _find_resume(self) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its state. Rank 0 picks and verifies it; a bad
        choice fails on every rank (not in one while the others wait)."""
        resume, saved, error = None, None, None
        if self.dist.is_main:  # verifying reads every file once; one rank is enough
            try:
                resume, saved = self.checkpoints.resume(self.exp.path.resume_state)
            except CheckpointError as e:
                error = str(e)
        resume, error = distributed.broadcast_object((resume, error))
        if error is not None:  # every rank stops, with the same message
            raise CheckpointError(error)
        if resume is not None and saved is None:
            saved = self.checkpoints.load_state(resume)
        if saved is not None:
            self._check_resumable(resume, saved)
        return resume, saved

    def _check_resumable(self, resume: Path, saved: dict) -> None:
        """What the YAML may not change since the checkpoint: the kind of each optimizer and
        the parameters it holds, laid out by ``freeze`` and the ``param_groups`` patterns."""
        old = yaml.safe_load(saved.get("config") or "{}") or {}
        problems = Problems()
        for name, spec in self.exp.steps.items():
            # as written in the YAML, then and now (not the resolved names)
            then = (old.get("steps") or {}).get(name) or {}
            now = (self.exp.options.get("steps") or {}).get(name) or {}
            new_run = (
                f"start a new run from the weights: path.pretrain_model_{spec.training}: "
                f"{self.checkpoints.network_path(int(saved['step']), spec.training)} with "
                f"path.resume_state: null and another `name`"
            )
            before, kind = then.get("optimizer"), now.get("optimizer")
            if before is not None and str(before).lower() != str(kind or spec.optimizer).lower():
                problems.add(
                    f"steps.{name}.optimizer",
                    f"is {kind!r}, but {resume} was trained with {before!r}, whose "
                    f"state cannot carry over to another kind of optimizer. Set it back to "
                    f"{before!r} to resume; or {new_run}",
                )
            for key, layout in (("freeze", _freeze_layout), ("param_groups", _group_layout)):
                if layout(then.get(key)) != layout(now.get(key)):
                    problems.add(
                        f"steps.{name}.{key}",
                        f"is {now.get(key)!r}, but {resume} was trained with "
                        f"{then.get(key)!r}: the optimizer state it holds is laid out by the "
                        "trained parameters and their groups, and cannot carry over to "
                        f"another layout. Set it back to resume (a group's options, lr "
                        f"included, may change); or {new_run}",
                    )
        problems.raise_if_any(self.exp.file)

    def _restore(self, resume: Path, saved: dict) -> None:
        """Continue from ``saved``. The optimizers' hyperparameters and the LR schedule are the
        YAML's, not the checkpoint's: what changed since takes effect and is logged."""
        self.step = self.env.step = self.rng.restored_step = int(saved["step"])
        self._last_good = self.step
        built = {name: hyperparameters(s.optimizer) for name, s in self.steps.items()}
        self.engine.load_checkpoint(self.checkpoints.engine_dir(self.step, self.engine.name))
        self.state.load_state_dict(saved, resume)
        if self.best is not None and self.best.step is not None:
            self.checkpoints.protect(self.best.step, "best")
            self._write_best()  # best.json may name a later best of an abandoned future
        applied = []
        for name, step in self.steps.items():
            changed = reapply_hyperparameters(step.optimizer, built[name])
            applied += [f"steps.{name} {k}: {a} -> {b}" for k, (a, b) in changed.items()]
            sched = self.schedulers[name]
            before = getattr(sched, "restored_base_lrs", sched.base_lrs)
            if before != sched.base_lrs:
                applied.append(f"steps.{name} lr: {before} -> {list(sched.base_lrs)}")
        if saved.get("config"):
            changes = option_changes(
                yaml.safe_load(saved["config"]) or {},
                self.exp.options,
                ignore=("path.resume_state",),
            )
            if changes:
                self.logger.info(
                    f"options changed since {resume}:\n" + "\n".join(f"  {c}" for c in changes)
                )
        if applied:
            self.logger.info(
                f"in effect from step {self.step} (the YAML's values, not the checkpoint's):\n"
                + "\n".join(f"  {a}" for a in applied)
            )

    def _load_weights(self, resume: Path | None, saved: dict | None) -> None:
        """A checkpoint's networks and EMA copies, else the ``pretrain_model_*`` files; LoRA
        networks get their adapters after their base weights. Before the engine wraps: DDP
        broadcasts them and DeepSpeed copies them."""
        self._ema_restored: set[str] = set()
        if saved is None:
            reports = self._load_pretrained()
            for name in self.lora.names():
                self.lora.start(name, self.raw_networks[name], reports.get(name))
            self._build_ema()
            return
        step = int(saved["step"])
        for name, net in self.raw_networks.items():
            self.lora.check_saved_kind(name, step)
            if name in self.lora.names():
                self.lora.resume(name, net, step)
            else:
                load_module(net, self.checkpoints.network_path(step, name), strict=True)
        self._build_ema()
        for name, ema in self.ema.items():
            ema_path = self.checkpoints.network_path(step, name, ema=True)
            if name in self.lora.bases:
                restored = self.lora.load_ema(name, ema.module, step)
            else:
                restored = ema_path.exists()
                if restored:
                    load_module(ema.module, ema_path, strict=True)
            if restored:
                self._ema_restored.add(name)
            else:
                log.warning("no EMA weights for %s in %s; restarting its average", name, resume)

    def _load_pretrained(self) -> dict[str, LoadReport]:
        reports = {}
        for name, path in self.exp.path.pretrain.items():
            report = load_module(
                self.raw_networks[name],
                path,
                strict=self.exp.path.strict_load,
                grow=self.exp.path.grow_embeddings,
            )
            reports[name] = report
            msg = f"initialised {name} from {path}"
            if report.grown:
                log.warning(
                    "%s: grew %s (old rows kept, new rows the mean of the old ones)",
                    msg,
                    "; ".join(report.grown),
                )
            log.warning("%s:\n%s", msg, report.describe()) if not report.ok else log.info(msg)
        return reports

    def _build_steps(self) -> None:
        """Optimizers first; then the engine wraps each trainable network with its
        optimizer; then each step's injectors and losses (which call the wrapped networks);
        then the LR schedules and the training data loader."""
        exp = self.exp
        optimizers, labels, trained_by = {}, {}, {}
        self._trainable_lines = []
        for name, spec in exp.steps.items():
            if not exp.networks[spec.training].trainable:
                raise ValueError(
                    f"steps.{name}.training: network {spec.training!r} has trainable: false"
                )
            optimizers[name], labels[name] = self._build_optimizer(name, spec)
            trained_by.setdefault(spec.training, name)
        # what each network trains (freeze removed the rest), for steps taking turns
        self._trainable = {
            n: [p for p in net.parameters() if p.requires_grad]
            for n, net in self.raw_networks.items()
        }
        for net_name, net_spec in exp.networks.items():
            if net_spec.trainable:
                step = trained_by.get(net_name)
                clip = exp.steps[step].clip_grad_eps if step else None
                self.networks[net_name] = self.engine.prepare(
                    net_name, self.raw_networks[net_name], optimizers.get(step), clip
                )
        provided = {"networks": self.networks, "env": self.env}
        self.steps: dict[str, ConfigurableStep] = {}
        for name, spec in exp.steps.items():
            injectors = [build_component(c, provided).to(self.device) for c in spec.injectors]
            losses = [build_component(c, provided).to(self.device) for c in spec.losses]
            self.steps[name] = ConfigurableStep(
                name,
                spec,
                self.networks[spec.training],
                optimizers[name],
                injectors,
                losses,
                self.engine,
                labels[name],
            )
        self._add_injector_metadata()
        self.schedulers = {
            name: build_scheduler(
                exp.train.default_lr_scheme,
                s.optimizer,
                exp.train.niter,
                exp.train.scheduler_kwargs,
                "train.default_lr_scheme",
            )
            for name, s in self.steps.items()
        }
        train = exp.datasets["train"]
        sampler = make_batch_sampler(
            self.datasets["train"],
            self.batch_size,
            _default(train.shuffle, True),
            self.seed,
            _default(train.drop_last, True),
            self.dist.rank,
            self.dist.world_size,
        )
        self.loader = TrainLoader(
            self.datasets["train"],
            sampler,
            train.n_workers,
            pin_memory=self.device.type == "cuda",
            seed=derive_seed(self.seed, self.dist.rank),
        )

    def _build_optimizer(self, name: str, spec: StepSpec) -> tuple[Optimizer, list[str]]:
        """Step ``name``'s optimizer over what its ``freeze`` leaves of its network, split by
        its ``param_groups``, and the entry of each param group; the counts go to the log."""
        net = self.raw_networks[spec.training]
        problems = Problems()  # found at validation, unless the meta device could not build it
        selection = select_parameters(
            net,
            spec.training,
            spec.freeze,
            spec.param_groups,
            spec.optimizer_params,
            f"steps.{name}",
            problems,
        )
        problems.raise_if_any(self.exp.file)
        optimizer, labels = build_step_optimizer(
            spec.optimizer, net, selection, f"steps.{name}.optimizer"
        )
        lrs = [optimizer.param_groups[labels.index(b.label)]["lr"] for b in selection.buckets]
        self._trainable_lines.append(describe(name, selection, lrs))
        return optimizer, labels

    def _add_injector_metadata(self) -> None:
        """What injectors know that inference needs (the mel features, the DVAE of Tortoise's
        GPT recipe) joins the data's metadata in every network file; the first injector
        giving a key wins, and a later different value is a warning."""
        for step in self.steps.values():
            for inj in step.injectors:
                inj = getattr(inj, "sub", inj)  # for_each: its sub-injector
                get = getattr(inj, "checkpoint_metadata", None)
                for key, value in (get() if callable(get) else {}).items():
                    known = self.checkpoint_metadata.setdefault(key, value)
                    if known != value:
                        log.warning(
                            "%s gives checkpoint metadata %r unlike an earlier injector; "
                            "checkpoints keep the first",
                            inj.path,
                            key,
                        )

    def _build_logging(self, start_step: int) -> None:
        """The logger (TensorBoard, wandb, console) and the evaluators, which write to it."""
        exp = self.exp
        self.logger = TrainingLogger(
            self.run_dir,
            name=exp.name,
            total_steps=exp.train.niter,
            start_step=start_step,
            print_freq=exp.logger.print_freq,
            use_tb=exp.use_tb_logger,
            wandb=exp.wandb,
            wandb_project=exp.logger.wandb_project,
            wandb_mode=exp.logger.wandb_mode,
            config=exp.options,
            enabled=self.dist.is_main,
            progress=exp.logger.progress_bar,
        )
        provided = {
            "networks": self.eval_networks(),
            "env": self.env,
            "datasets": self.datasets,
            "logger": self.logger,
            "steps": self.steps,
        }
        self.evaluators = {
            spec.name: build_component(spec, provided) for spec in exp.eval.evaluators
        }

    def _remove_leftovers(self) -> None:
        """Temporary files of saves a kill interrupted (rank 0 writes them, so it cleans)."""
        if not self.dist.is_main:
            return
        count, size = self.checkpoints.remove_leftovers()
        if count:
            self.logger.info(
                f"removed {count} leftover temporary file(s) of interrupted saves "
                f"({size} bytes) from {self.run_dir}"
            )

    def _register_state(self) -> None:
        """What a checkpoint's training state holds (see :mod:`trainer.training_state`)."""
        self.state = TrainingState()
        self.counters = Counters()
        if not self.engine.owns_optimizer_state:  # DeepSpeed saves its optimizers itself
            self.state.register(
                "optimizers", Group({n: s.optimizer for n, s in self.steps.items()}, "optimizer")
            )
        self.state.register("schedulers", Group(self.schedulers, "LR schedule"))
        self.state.register("engine", self.engine)
        self.state.register("loader", self.loader)
        self.state.register("ema", _EmaCounts(self.ema, self._ema_restored))
        self.rng = RandomStreams(self.dist, self.seed)
        self.state.register("rng", self.rng)
        self.state.register("counters", self.counters)
        t = self.exp.train
        self.best = (
            BestTracker(t.best_metric, t.best_mode, t.early_stop_patience)
            if t.best_metric
            else None
        )
        if self.best is not None:
            self.state.register("best", self.best)
        for name, ev in self.evaluators.items():
            if callable(getattr(ev, "state_dict", None)):
                self.state.register(f"evaluator.{name}", ev)

    def _write_run_config(self, resume: Path | None) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yml").write_text(
                yaml.safe_dump(self.exp.options, sort_keys=False)
            )
        ranks = (
            f"; {self.dist.world_size} ranks, {self.batch_size} items each per step"
            if self.dist.world_size > 1
            else ""
        )
        self.logger.info(
            f"run folder {self.run_dir}; seed {self.seed}; device {self.device}; "
            f"precision {self.exp.precision}; engine {self.engine.name}{ranks}"
            + (f"; resumed from {resume} at step {self.step}" if resume else "")
        )
        for line in [*self.lora.lines, *self._trainable_lines]:
            self.logger.info(line)

    def _per_rank_batch_size(self, phase: str) -> int | None:
        """``datasets.<phase>.batch_size`` is the global batch; one rank loads its share."""
        spec, world = self.exp.datasets.get(phase), self.dist.world_size
        if spec is None or spec.batch_size is None or world == 1:
            return spec.batch_size if spec else None
        if spec.batch_size % world:
            raise ConfigError(
                [
                    (
                        f"datasets.{phase}.batch_size",
                        f"{spec.batch_size} is the global batch and must be divisible "
                        f"by the {world} ranks; use a multiple of {world}",
                    )
                ],
                self.exp.file,
            )
        return spec.batch_size // world

    def eval_networks(self) -> dict[str, nn.Module]:
        """Networks for evaluators: the EMA copy where there is one."""
        return {
            n: (self.ema[n].module if n in self.ema else net)
            for n, net in self.raw_networks.items()
        }

    # ----------------------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step of every step whose gate is open on this batch."""
        batch = _to_device(batch, self.device)
        chunks = split_batch(batch, self.exp.train.mega_batch_factor)
        logs: dict[str, torch.Tensor] = {}
        total = None
        multi = len(self.steps) > 1
        for name, step in self.steps.items():
            if not step.gate.open(self.step):
                continue
            if multi:  # only this step's network collects gradients (not its frozen part,
                # not a LoRA network's base: the parameters its optimizer holds)
                for net in self.raw_networks.values():
                    net.requires_grad_(False)
                for p in self._trainable[step.spec.training]:
                    p.requires_grad_(True)
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
                self.counters.skipped_steps += 1
                self._window_skips[name] = self._window_skips.get(name, 0) + 1
        self._draw_visuals(chunks[0])
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
        """Run until ``train.niter`` steps, an early stop (``train.early_stop_patience``), a
        ``quit`` command or Ctrl-C; save at the end."""
        niter = self.exp.train.niter
        listener = CommandListener(on_message=self.logger.info)
        if self.exp.logger.stdin_commands and self.dist.is_main:
            listener.start()
        meter, saved_at = Meter(), self.step  # a resumed state is already saved
        try:
            if self.step >= niter:
                self.logger.info(
                    f"nothing to do: at step {self.step} of train.niter {niter} "
                    f"(raise it with -o train.niter=N to continue)"
                )
            elif self._out_of_patience():
                self.logger.info(
                    f"nothing to do: {self.best.metric} has not improved for "
                    f"{self.best.since} measurement(s) (raise train.early_stop_patience to "
                    f"continue)"
                )
            if self._evaluate_at_start():
                saved_at = self.step
            self._set_train_mode(True)
            with GracefulInterrupt(
                on_signal=lambda s: self.logger.info(
                    "interrupted: saving a checkpoint after this step (again to abort)"
                )
            ) as stop:
                # All ranks stop at the same step, whichever of them got the signal first.
                while (
                    self.step < niter
                    and not self._out_of_patience()
                    and not distributed.any_rank(stop.requested)
                ):
                    if not self._one_step(meter):
                        continue  # out of memory: the batch was skipped, the step is not done
                    commands = self._poll(listener)
                    if self._periodic(meter, commands):
                        saved_at = self.step
                    if "quit" in commands:
                        self.logger.info("quit: saving and stopping")
                        break
                    if self._out_of_patience():
                        self.stopped_early = (
                            f"{self.best.metric} did not improve for {self.best.since} "
                            f"measurement(s) (train.early_stop_patience {self.best.patience})"
                        )
            if saved_at != self.step:
                self.save()
            if self.stopped_early:
                best = self.best.step
                state = None if best is None else self.checkpoints.state_path(best)
                self.logger.info(self.best.stop_message(self.step, state, self.run_dir))
        finally:
            listener.stop()
            self.logger.close()

    def _evaluate_at_start(self) -> bool:
        """``eval.at_start``: the "before" figures of validation and the evaluators (which
        count for train.best_metric); True when that saved a checkpoint (a best at step 0)."""
        if self.step > 0 or not self.exp.eval.at_start or self.exp.train.niter == 0:
            return False
        if self._measure(bool(self.exp.train.val_freq), True):
            self.save()
            return True
        return False

    def _measure(self, validate: bool, evaluate: bool) -> bool:
        """Validation and/or the evaluators, then the step's figure of train.best_metric
        against the best so far; True when this step is a new best (to be saved)."""
        results = self.validate() if validate else {}
        if evaluate:
            results.update(self.run_evaluators())
        return self._track_best(results, evaluate and bool(self.evaluators))

    def _track_best(self, results: dict[str, float], evaluated: bool) -> bool:
        """See :mod:`trainer.best`. Rank 0 decides (the evaluators run there) and every rank
        follows, since saving and stopping are collective."""
        best = self.best
        if best is None:
            return False
        before, outcome, error = best.step, None, None
        if self.dist.is_main:
            error = best.missing(self.step, results, evaluated)
            outcome = None if error else best.observe(self.step, results)
        if self.dist.world_size > 1:
            state, outcome, error = distributed.broadcast_object(
                (best.state_dict(), outcome, error)
            )
            best.load_state_dict(state)
        if error is not None:
            if self.step > 0:  # not to lose the steps trained so far
                self.save()
                error += (
                    f". A checkpoint of step {self.step} was saved: correct the name and "
                    f"resume (path.resume_state: auto)"
                )
            raise ConfigError([("train.best_metric", error)], self.exp.file)
        if outcome is None:
            return False
        improved, line = outcome
        self.logger.info(line)
        if best.value is not None:
            self.logger.log_scalars(self.step, {f"best/{best.metric}": best.value})
        if improved:
            if before is not None:
                self.checkpoints.unprotect(before, "best")  # keep_last may prune it now
            self.checkpoints.protect(self.step, "best")
        return improved

    def _out_of_patience(self) -> bool:
        return self.best is not None and self.best.exhausted

    def _write_best(self) -> None:
        """``best.json`` for the best step, whose checkpoint exists (rank 0 writes it)."""
        step = self.best.step
        if not self.dist.is_main or step is None:
            return
        state = self.checkpoints.state_path(step)
        if not state.is_file():
            self.logger.warning(
                f"the best {self.best.metric} was at step {step}, whose checkpoint {state} "
                f"is gone; best.json is not updated until a new best"
            )
            return
        self.best.record(self.run_dir, [*self.checkpoints.step_files(step), state])

    def _one_step(self, meter: Meter) -> bool:
        """Train on the next batch; False when it ran out of memory and was skipped."""
        t0 = time.perf_counter()
        batch = next(self.loader)
        data_time = time.perf_counter() - t0
        self.step += 1
        self.env.step = self.step
        skipped_before = self.counters.skipped_steps
        try:
            logs = self.train_step(batch)
        except BatchOutOfMemory as e:
            oom = (e.where, e.message, describe_batch(batch))
        else:
            oom = None
        if oom is not None:  # out of the handler: the exception held the failed graph
            del batch
            self._skip_oom_batch(*oom)
            return False
        self._oom_streak.clear()
        self._track_streak(self.counters.skipped_steps > skipped_before)
        meter.add(logs, batch_size_of(batch), data_time)
        self.logger.progress(self.step)
        for callback in self.step_callbacks:
            callback(self.step, logs)
        return True

    def _skip_oom_batch(self, where: str, message: str | None, shapes: str) -> None:
        """A batch ran out of memory (on some rank; every rank comes here): it made no update
        and the step is not done. Clear the gradients, give the memory back, count the batch
        and name its shapes; ``train.max_oom_streak`` batches in a row save and stop."""
        self.step -= 1
        self.env.step = self.step
        for step in self.steps.values():
            step.optimizer.zero_grad(set_to_none=True)
        for net in self.raw_networks.values():  # a frozen network may hold some too
            net.zero_grad(set_to_none=True)
        self.engine.after_oom()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        mine = (self.dist.rank, where, message, shapes) if message is not None else None
        failures = [f for f in distributed.all_gather_object(mine) if f is not None]
        described = describe_failures(failures, self.dist.world_size)
        self.counters.oom_skipped += 1
        self._oom_streak.append(described)
        self.logger.warning(
            f"out of memory, batch skipped ({self.counters.oom_skipped} so far; step "
            f"{self.step + 1} goes on with the next batch): {described}"
        )
        limit = self.exp.train.max_oom_streak
        if limit is not None and len(self._oom_streak) >= limit:
            self._stop_oom_streak()

    def _stop_oom_streak(self) -> None:
        """Save the weights (the failed batches did not change them) and stop."""
        self.save()
        msg = streak_message(self._oom_streak, self.step, self.checkpoints.state_path(self.step))
        self.logger.log_scalars(self.step, {"train/oom_skipped": self.counters.oom_skipped})
        self.logger.error(msg)
        raise OutOfMemoryStreak(msg)

    def _draw_visuals(self, state: dict[str, Any]) -> None:
        """DLAS's ``logger.visuals``: the first item of those state keys as images in
        TensorBoard (``visuals/<key>``) every ``visual_debug_rate`` steps."""
        opts = self.exp.logger
        every = opts.visual_debug_rate or opts.print_freq
        if not opts.visuals or self.step % every or not self.dist.is_main:
            return
        for key in opts.visuals:
            image = visual_image(state[key], opts.is_mel_spectrogram) if key in state else None
            if image is not None:
                self.logger.log_image(f"visuals/{key}", image, self.step)

    def _track_streak(self, skipped: bool) -> None:
        """Count steps in a row with a skipped update; stop at ``train.max_nonfinite_streak``.

        While a streak runs, the last checkpoint saved before it is protected from pruning:
        it is where to resume from if the streak turns out to be a diverged run.
        """
        if not skipped:
            if self._streak and self._last_good is not None:
                self.checkpoints.unprotect(self._last_good, "streak")
            self._streak = 0
            return
        self._streak += 1
        if self._streak == 1 and self._last_good is not None:
            self.checkpoints.protect(self._last_good, "streak")
        limit = self.exp.train.max_nonfinite_streak
        if limit is None or self._streak < limit:
            return
        start = self.step - self._streak + 1
        if self._last_good is None:
            good = "no checkpoint was saved before it (restart, e.g. from pretrained weights)"
            resume = ""
        else:
            state = self.checkpoints.state_path(self._last_good)
            good = f"the last checkpoint saved before it is {state}"
            resume = f"resume from it with path.resume_state={state}, "
        msg = (
            f"stopping: {self._streak} steps in a row had a non-finite gradient and skipped "
            f"their update (the streak began at step {start}); {good}. No checkpoint was saved of "
            f"these weights. Lower the learning rate or check the data, then {resume}or raise "
            f"train.max_nonfinite_streak (null: never stop)"
        )
        self.logger.error(msg)
        raise NonFiniteStreak(msg)

    def _periodic(self, meter: Meter, commands: set[str]) -> bool:
        """Logging, validation, evaluators and saving when their frequency (or a command)
        says so, and at a new best of ``train.best_metric``; True when a checkpoint was saved."""
        s, lopts = self.step, self.exp.logger
        val_freq, eval_every = self.exp.train.val_freq, self.exp.eval.every
        if s % lopts.print_freq == 0 or s == self.exp.train.niter:
            self._log_train(meter)
            meter.reset()
        validate = bool(val_freq and s % val_freq == 0) or "eval" in commands
        evaluate = bool(eval_every and s % eval_every == 0) or "eval" in commands
        new_best = (validate or evaluate) and self._measure(validate, evaluate)
        if (
            new_best  # the best step always has a checkpoint
            or (lopts.save_checkpoint_freq and s % lopts.save_checkpoint_freq == 0)
            or "save" in commands
        ):
            self.save()
            return True
        return False

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
        if self.step % self.exp.logger.print_freq:  # a collective every step would cost
            return set()
        return set(distributed.broadcast_object(listener.poll()))

    def _log_train(self, meter: Meter) -> None:
        scalars = distributed.all_reduce_mean(meter.summary())
        for key in [k for k in scalars if k.endswith("_per_sec")]:
            scalars[key] *= self.dist.world_size  # throughput of the whole job, not one rank
        for name, step in self.steps.items():
            scalars[f"lr/{name}"] = step.optimizer.param_groups[0]["lr"]
            if step.spec.param_groups:  # each group's own lr (TensorBoard only)
                for label, group in zip(step.group_labels, step.optimizer.param_groups):
                    scalars.setdefault(f"lr/{name}/{label}", group["lr"])
            scalars[f"skipped/{name}"] = self._window_skips.get(name, 0)
            for loss in step.losses:  # weighted values are derived here, not every step
                raw = scalars.get(f"loss/{loss.component_name}")
                if raw is not None:
                    scalars[f"loss/{loss.component_name}_weighted"] = raw * loss.weight
        self._window_skips.clear()
        scalars["train/skipped_steps"] = self.counters.skipped_steps
        scalars["train/oom_skipped"] = self.counters.oom_skipped
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
        spec = self.exp.datasets["val"]
        self._set_train_mode(False)
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in eval_loader(
                self.datasets["val"],
                self.val_batch_size,
                spec.n_workers,
                self.dist.rank,
                self.dist.world_size,
            ):
                batch = _to_device(batch, self.device)
                n = batch_size_of(batch)
                for chunk in split_batch(batch, self.exp.train.mega_batch_factor):
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
        self.logger.info(
            f"validation at step {self.step}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in results.items())
        )
        return results

    def run_evaluators(self) -> dict[str, float]:
        """Run every evaluator (rank 0 only) and log its scalars under ``eval/`` (``eval/<name>/``
        with several evaluators: :func:`trainer.evaluators.base.scalar_prefix`)."""
        results: dict[str, float] = {}
        if not self.evaluators or not self.dist.is_main:
            return results
        self._set_train_mode(False)
        try:
            for name, ev in self.evaluators.items():
                prefix = scalar_prefix(name, len(self.evaluators))
                with torch.no_grad():
                    for k, v in ev.evaluate(self.step).items():
                        results[f"{prefix}{k}"] = float(v)
        finally:
            self._set_train_mode(True)
        self.logger.log_scalars(self.step, results)
        return results

    # ---------------------------------------------------------------------------- saving
    def save(self) -> Path | None:
        """Write a checkpoint: engine files (every rank), then networks, EMA copies and the
        training state (rank 0), the state last so that only complete checkpoints count."""
        self.engine.save_checkpoint(self.checkpoints.engine_dir(self.step, self.engine.name))
        parts = self.state.state_dict()  # on every rank: the random streams are gathered
        distributed.barrier()  # every rank's engine files are written
        path = None
        if self.dist.is_main:
            nets = {
                n: (net, self.exp.networks[n].which_model, self.exp.networks[n].kwargs)
                for n, net in self.raw_networks.items()
            }
            header = {
                "seed": self.seed,
                "engine_name": self.engine.name,
                "world_size": self.dist.world_size,
                "config": yaml.safe_dump(self.exp.options, sort_keys=False),
            }
            path = self.checkpoints.save(
                self.step,
                nets,
                {**header, **parts},
                ema={n: e.module for n, e in self.ema.items()},
                metadata=self.checkpoint_metadata,
                adapters=self.lora.adapter_files(),
            )
            self.logger.info(f"saved checkpoint at step {self.step}: {path}")
            if self.best is not None and self.best.step == self.step:
                self._write_best()
        if not self._streak:  # a save inside a streak may hold diverging weights
            self._last_good = self.step
        distributed.barrier()
        return path


class _EmaCounts:
    """How many updates each EMA average holds (its weights are in the network files)."""

    def __init__(self, ema: dict[str, AveragedModel], restored: set[str]) -> None:
        self.ema, self.restored = ema, restored

    def state_dict(self) -> dict[str, int]:
        return {n: int(e.n_averaged) for n, e in self.ema.items()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in self.restored:  # an average whose weights were missing starts over
            self.ema[name].n_averaged.fill_(state.get(name, 1))


def _on_console(key: str, value: float) -> bool:
    """The console line shows raw losses, lr, grad norm and throughput; TensorBoard has all."""
    if key.startswith("lr/"):
        return key.count("/") == 1  # not each param group's
    if key.startswith(("loss/", "grad_norm/")):
        return not key.endswith("_weighted")
    if key.startswith(("skipped/", "train/skipped", "train/oom")):
        return value > 0
    return key in ("perf/samples_per_sec", "train/epoch")


def _freeze_layout(freeze: Any) -> list[str]:
    """``freeze`` as it shapes the optimizer: the set of patterns."""
    return sorted(map(str, freeze or []))


def _group_layout(groups: Any) -> list[list[Any]]:
    """``param_groups`` as it shapes the optimizer: each entry's patterns, in order."""
    out = []
    for group in groups or []:
        match = group.get("match") if isinstance(group, dict) else group
        out.append(match if isinstance(match, list) else [match])
    return out


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
