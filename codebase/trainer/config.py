"""The experiment schema: trainer-level sections as dataclasses, components bound by signature.

:func:`validate_experiment` walks the whole experiment (datasets, networks, steps with their
injectors and losses, the LR schedule, evaluators) and reports every problem at once, before
any tensor exists. It returns an :class:`Experiment` whose component specs hold the already
type-checked constructor arguments.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from trainer.registry import Registry, RegistryError, did_you_mean
from utils.schema import (ConfigError, Problems, _MISSING, bind_options, build_dataclass, coerce,
                          join, signature_params)

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]

# DLAS keys that have no effect here: accepted (so DLAS files load) with a warning.
DLAS_NO_EFFECT = {
    "": {"scale", "start_step", "distortion", "dist"},
    "logger": {"visuals", "visual_debug_rate", "is_mel_spectrogram", "disable_state_saving"},
    "steps.*": {"loss_log_buffer"},
}


@dataclass
class TrainOptions:
    """``train:`` section (DLAS spelling). LR schedule options go to the chosen scheduler."""
    niter: int  # number of optimizer steps in the whole run
    mega_batch_factor: int = 1  # gradient accumulation: micro-batches per update
    val_freq: int | None = None  # validate every N steps (needs datasets.val)
    default_lr_scheme: str = "Constant"  # MultiStepLR | CosineAnnealing | Constant
    ema_rate: float | None = None  # e.g. 0.999; keeps an EMA copy of every trainable network


@dataclass
class LoggerOptions:
    """``logger:`` section."""
    print_freq: int = 100  # console line + TensorBoard scalars every N steps
    save_checkpoint_freq: int | None = None  # None: only at the end, on Ctrl-C and on `save`
    keep_last: int | None = None  # keep only the newest N checkpoints
    progress_bar: bool = True
    stdin_commands: bool = True  # `save`, `eval`, `quit` + Enter while training
    wandb_project: str | None = None  # default: the experiment name
    wandb_mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's default


@dataclass
class PathOptions:
    """``path:`` section; ``pretrain_model_<net>`` keys are collected into ``pretrain``."""
    root: Path | None = None  # run folder; default: <experiment file's folder>/<name>
    resume_state: str | None = None  # "auto" or a training_state file
    strict_load: bool = True  # pretrain_model_* must match the network exactly
    pretrain: dict[str, Path] = field(default_factory=dict)


@dataclass
class EvalOptions:
    """``eval:`` section: evaluators run every ``every`` steps (and on `eval`); ``at_start``
    also runs them and the validation once before the first step (a "before" figure)."""
    every: int | None = None
    at_start: bool = False
    evaluators: dict[str, dict] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """``datasets.<phase>``: loader options here, the rest goes to the dataset's constructor."""
    mode: str
    name: str = ""
    # The global batch: items per update over all ranks; each of N DDP/DeepSpeed ranks loads
    # batch_size / N (must divide). A dataset's token budget (max_tokens) is per rank instead.
    batch_size: int | None = None
    n_workers: int = 0
    phase: Literal["train", "val"] | None = None
    shuffle: bool | None = None  # default: true for train, false for val
    drop_last: bool | None = None  # default: true for train, false for val
    cls: Any = None  # filled by validation: the registered dataset
    kwargs: dict = field(default_factory=dict)


@dataclass
class NetworkSpec:
    """``networks.<name>``: ``which_model_G`` (or ``_D`` / plain ``which_model``) + ``kwargs``."""
    type: Literal["generator", "discriminator"] = "generator"
    which_model: str = ""
    kwargs: dict = field(default_factory=dict)
    trainable: bool = True
    factory: Any = None


@dataclass
class ComponentSpec:
    """An injector, loss or evaluator: its class, gates, state keys and constructor kwargs."""
    name: str
    path: str
    cls: Any
    kwargs: dict
    common: dict  # in/out/weight/train/eval/after/before/every ...


@dataclass
class StepSpec:
    """``steps.<name>``: one optimizer over one network, fed by injectors and losses."""
    training: str
    optimizer: str = "adamw"
    optimizer_params: dict = field(default_factory=dict)
    injectors: dict[str, dict] = field(default_factory=dict)
    losses: dict[str, dict] = field(default_factory=dict)
    clip_grad_eps: float | None = None
    after: int = 0
    before: int | None = None
    every: int = 1
    injector_specs: list = field(default_factory=list)
    loss_specs: list = field(default_factory=list)


@dataclass
class Experiment:
    """A validated experiment."""
    name: str
    model: Literal["extensibletrainer"] = "extensibletrainer"
    seed: int | None = None
    device: str = "auto"
    engine: Literal["local", "deepspeed"] = "local"  # local: one process or DDP (torchrun)
    precision: Precision = "fp32"
    fp16: bool | None = None  # DLAS spelling of precision: fp16
    checkpointing_enabled: bool = False  # gradient checkpointing in networks that support it
    use_tb_logger: bool = True
    wandb: bool = False
    plugins: list[str] = field(default_factory=list)
    datasets: dict[str, dict] = field(default_factory=dict)
    networks: dict[str, dict] = field(default_factory=dict)
    steps: dict[str, dict] = field(default_factory=dict)
    path: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    logger: dict = field(default_factory=dict)
    deepspeed: dict = field(default_factory=dict)  # engine: deepspeed options (see engines/)
    gpu_ids: list[int] | None = None  # DLAS: the first id picks the cuda device
    # filled by validation, not options
    file: str = field(default="", init=False)
    base_dir: Path = field(default=Path("."), init=False)
    raw: dict = field(default_factory=dict, init=False)
    dataset_specs: dict[str, DatasetSpec] = field(default_factory=dict, init=False)
    network_specs: dict[str, NetworkSpec] = field(default_factory=dict, init=False)
    step_specs: dict[str, StepSpec] = field(default_factory=dict, init=False)
    train_opts: TrainOptions | None = field(default=None, init=False)
    scheduler_kwargs: dict = field(default_factory=dict, init=False)
    logger_opts: LoggerOptions = field(default_factory=LoggerOptions, init=False)
    path_opts: PathOptions = field(default_factory=PathOptions, init=False)
    eval_opts: EvalOptions = field(default_factory=EvalOptions, init=False)
    evaluator_specs: list = field(default_factory=list, init=False)
    deepspeed_opts: Any = field(default=None, init=False)

    @property
    def run_dir(self) -> Path:
        return self.path_opts.root or (self.base_dir / self.name)


SECTION_FIELDS = {"datasets", "networks", "steps", "path", "train", "eval", "logger", "deepspeed"}


def load_experiment_cli(args: Any) -> Experiment | None:
    """The validated experiment of a CLI's ``-opt``/``-o`` arguments (see
    :func:`utils.options.experiment_parser`); on a bad file or option, print the error to
    stderr and return None (the CLI exits with 2). Also sets up warning-level logging."""
    import sys

    from utils.options import load_options

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return validate_experiment(load_options(args.opt, args.override))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def validate_experiment(opt: dict) -> Experiment:
    """Check an options dict (from :func:`utils.options.load_options`); raise ConfigError with
    every problem found, or return the validated :class:`Experiment`."""
    from trainer import components  # noqa: F401 - imports every built-in component family
    from utils.options import import_plugins

    source = opt.get("_file")
    base_dir = Path(opt.get("_base_dir", "."))
    raw = {k: v for k, v in opt.items() if not k.startswith("_")}
    problems = Problems()
    _warn_dlas(raw, "")
    exp = build_dataclass(Experiment, _without(raw, ""), "", problems, base_dir)
    if exp is None:
        problems.raise_if_any(source)
    exp.file, exp.base_dir, exp.raw = str(source or ""), base_dir, raw
    if exp.fp16 is not None and "precision" not in raw:
        exp.precision = "fp16" if exp.fp16 else "fp32"
    if exp.gpu_ids and "device" not in raw:
        exp.device = f"cuda:{exp.gpu_ids[0]}"
    try:
        import_plugins(exp.plugins, base_dir)
    except ConfigError as e:
        problems.items.extend(e.problems)
    except Exception as e:  # a plugin that fails to import
        problems.add("plugins", f"importing a plugin failed: {type(e).__name__}: {e}")

    _validate_sections(exp, problems)
    problems.raise_if_any(source)
    return exp


def _validate_sections(exp: Experiment, problems: Problems) -> None:
    from data import DATASETS
    from models import MODELS
    from trainer.engines import validate_engine_options
    from trainer.evaluators import EVALUATORS
    from trainer.lr_scheduler import SCHEDULER_RUNTIME_ARGS, SCHEDULERS

    base = exp.base_dir
    # train: trainer fields + the LR scheduler's own options
    train = dict(exp.train)
    scheme = train.get("default_lr_scheme", TrainOptions.default_lr_scheme)
    sched = _lookup(SCHEDULERS, scheme, "train.default_lr_scheme", problems)
    own, rest = _split(train, TrainOptions)
    exp.train_opts = build_dataclass(TrainOptions, own, "train", problems, base)
    if "train" not in exp.raw:
        problems.add("train", "missing required section (needs at least niter)")
    if sched is not None:
        _report_unknown(rest, TrainOptions, sched, "train", problems, SCHEDULER_RUNTIME_ARGS)
        exp.scheduler_kwargs = bind_options(sched, {k: v for k, v in rest.items()
                                                    if _accepts(sched, k)},
                                            "train", problems, runtime=SCHEDULER_RUNTIME_ARGS,
                                            base_dir=base)
    _warn_dlas(exp.logger, "logger")
    exp.logger_opts = build_dataclass(LoggerOptions, _without(exp.logger, "logger"), "logger",
                                      problems, base) or LoggerOptions()
    exp.path_opts = _validate_path(exp, problems)
    exp.eval_opts = build_dataclass(EvalOptions, exp.eval, "eval", problems, base) or EvalOptions()
    validate_engine_options(exp, problems)

    for phase, ds in exp.datasets.items():
        exp.dataset_specs[phase] = _validate_dataset(phase, ds, problems, base, DATASETS)
    if "train" not in exp.datasets:
        problems.add("datasets.train", "missing required section")
    for name, net in exp.networks.items():
        exp.network_specs[name] = _validate_network(name, net, problems, base, MODELS)
    if not exp.networks:
        problems.add("networks", "missing: declare at least one network")
    loss_owner: dict[str, str] = {}
    for name, step in exp.steps.items():
        exp.step_specs[name] = _validate_step(exp, name, step, problems)
        for loss in (step.get("losses") or {}) if isinstance(step, dict) else ():
            if loss in loss_owner:  # losses are logged by name: two steps may not share one
                problems.add(f"steps.{name}.losses.{loss}", f"a loss called {loss!r} is already "
                             f"declared in steps.{loss_owner[loss]}; loss names must be unique")
            loss_owner[loss] = name
    if not exp.steps:
        problems.add("steps", "missing: declare at least one training step")
    for name, ev in exp.eval_opts.evaluators.items():
        spec = _validate_component(EVALUATORS, ev, f"eval.evaluators.{name}", name, problems,
                                   base, common_keys=("type",))
        if spec:
            exp.evaluator_specs.append(spec)
    t = exp.train_opts
    if t is not None:
        if t.niter < 1:
            problems.add("train.niter", f"must be >= 1, got {t.niter}")
        if t.mega_batch_factor < 1:
            problems.add("train.mega_batch_factor", f"must be >= 1, got {t.mega_batch_factor}")
        if t.ema_rate is not None and not 0.0 < t.ema_rate < 1.0:
            problems.add("train.ema_rate", f"must be between 0 and 1 (e.g. 0.999), got {t.ema_rate}")
        if t.val_freq and "val" not in exp.datasets:
            problems.add("train.val_freq", "is set but there is no datasets.val to validate on")


def _validate_path(exp: Experiment, problems: Problems) -> PathOptions:
    path = dict(exp.path)
    pretrain = {}
    for key in [k for k in path if k.startswith("pretrain_model_")]:
        net = key[len("pretrain_model_"):]
        value = path.pop(key)
        if net not in exp.networks:
            problems.add(f"path.{key}", f"no network called {net!r}{did_you_mean(net, exp.networks)}"
                                        f"; networks: {', '.join(exp.networks) or '(none)'}")
        elif value is not None:
            pretrain[net] = coerce(value, Path, f"path.{key}", problems, exp.base_dir)
    resume = path.get("resume_state")
    if isinstance(resume, str) and resume != "auto":
        path["resume_state"] = str(exp.base_dir / Path(resume).expanduser())
    opts = build_dataclass(PathOptions, path, "path", problems, exp.base_dir) or PathOptions()
    opts.pretrain = pretrain
    return opts


def _validate_dataset(phase: str, ds: Any, problems: Problems, base: Path,
                      registry: Registry) -> DatasetSpec | None:
    path = f"datasets.{phase}"
    if not _is_mapping(ds, path, problems):
        return None
    if "mode" not in ds:
        problems.add(f"{path}.mode", f"missing required option; registered datasets: "
                                     f"{', '.join(registry.names()) or '(none)'}")
        return None
    cls = _lookup(registry, ds["mode"], f"{path}.mode", problems)
    own, rest = _split(ds, DatasetSpec, exclude=("cls", "kwargs"))
    spec = build_dataclass(DatasetSpec, own, path, problems, base)
    if cls is None or spec is None:
        return spec
    runtime = ("phase",)
    _report_unknown(rest, DatasetSpec, cls, path, problems, runtime)
    spec.cls = cls
    spec.kwargs = bind_options(cls, {k: v for k, v in rest.items() if _accepts(cls, k)}, path,
                               problems, runtime=runtime, base_dir=base)
    return spec


def _validate_network(name: str, net: Any, problems: Problems, base: Path,
                      registry: Registry) -> NetworkSpec | None:
    path = f"networks.{name}"
    if not _is_mapping(net, path, problems):
        return None
    net = dict(net)
    which = [k for k in ("which_model_G", "which_model_D", "which_model") if k in net]
    if len(which) != 1:
        problems.add(path, "set exactly one of which_model_G (generator), which_model_D "
                           f"(discriminator) or which_model; found {which or 'none'}")
        return None
    model = net.pop(which[0])
    net["which_model"] = model
    spec = build_dataclass(NetworkSpec, net, path, problems, base)
    factory = _lookup(registry, model, f"{path}.{which[0]}", problems)
    if spec is None or factory is None:
        return spec
    spec.factory = factory
    spec.kwargs = bind_options(factory, spec.kwargs, f"{path}.kwargs", problems, base_dir=base)
    return spec


def _validate_step(exp: Experiment, name: str, step: Any, problems: Problems) -> StepSpec | None:
    from trainer.injectors import INJECTORS
    from trainer.losses import LOSSES
    from trainer.optimizers import OPTIMIZER_RUNTIME_ARGS, OPTIMIZERS

    path = f"steps.{name}"
    if not _is_mapping(step, path, problems):
        return None
    _warn_dlas(step, "steps.*", path)
    spec = build_dataclass(StepSpec, _without(step, "steps.*"), path, problems, exp.base_dir)
    if spec is None:
        return None
    if spec.training not in exp.networks:
        problems.add(f"{path}.training", f"no network called {spec.training!r}"
                                         f"{did_you_mean(spec.training, exp.networks)}; networks: "
                                         f"{', '.join(exp.networks) or '(none)'}")
    opt_factory = _lookup(OPTIMIZERS, spec.optimizer, f"{path}.optimizer", problems)
    if opt_factory is not None:
        spec.optimizer_params = bind_options(opt_factory, spec.optimizer_params,
                                             f"{path}.optimizer_params", problems,
                                             runtime=OPTIMIZER_RUNTIME_ARGS, base_dir=exp.base_dir)
    for inj_name, inj in spec.injectors.items():
        c = _validate_component(INJECTORS, inj, f"{path}.injectors.{inj_name}", inj_name, problems,
                                exp.base_dir, common_keys=INJECTOR_COMMON)
        if c:
            spec.injector_specs.append(c)
    if not spec.losses:
        problems.add(f"{path}.losses", "missing: a training step needs at least one loss")
    for loss_name, loss in spec.losses.items():
        c = _validate_component(LOSSES, loss, f"{path}.losses.{loss_name}", loss_name, problems,
                                exp.base_dir, common_keys=LOSS_COMMON)
        if c:
            spec.loss_specs.append(c)
    return spec


INJECTOR_COMMON = ("type", "in", "out", "train", "eval", "after", "before", "every")
LOSS_COMMON = ("type", "weight", "after", "before", "every")
_COMMON_TYPES = {"in": str | list[str] | dict[str, str], "out": str | list[str],
                 "train": bool, "eval": bool, "after": int, "before": int | None, "every": int,
                 "weight": float}


def _validate_component(registry: Registry, options: Any, path: str, name: str,
                        problems: Problems, base: Path, common_keys: tuple[str, ...]
                        ) -> ComponentSpec | None:
    if not _is_mapping(options, path, problems):
        return None
    if "type" not in options:
        problems.add(f"{path}.type", f"missing required option; registered {registry.kind}s: "
                                     f"{', '.join(registry.names())}")
        return None
    cls = _lookup(registry, options["type"], f"{path}.type", problems)
    if cls is None:
        return None
    common = {}
    for key in common_keys:
        if key in options and key != "type":
            value = coerce(options[key], _COMMON_TYPES[key], f"{path}.{key}", problems, base)
            if value is not _MISSING:
                common[key] = value
    own = {k: v for k, v in options.items() if k not in common_keys}
    kwargs = cls.check_options(own, path, problems, base, common_keys)
    return ComponentSpec(name=name, path=path, cls=cls, kwargs=kwargs, common=common)


def _is_mapping(value: Any, path: str, problems: Problems) -> bool:
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping, got {type(value).__name__}")
    return isinstance(value, dict)


def _lookup(registry: Registry, name: Any, path: str, problems: Problems) -> Any:
    try:
        return registry.get(name)
    except RegistryError as e:
        problems.add(path, str(e))
        return None


def _accepts(target: Callable, key: str) -> bool:
    params, _, var_kw = signature_params(target)
    return key in params or var_kw


def _split(options: dict, cls: type, exclude: tuple[str, ...] = ()) -> tuple[dict, dict]:
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return ({k: v for k, v in options.items() if k in names},
            {k: v for k, v in options.items() if k not in names})


def _report_unknown(rest: dict, cls: type, target: Callable, path: str, problems: Problems,
                    runtime: tuple[str, ...]) -> None:
    """Keys in neither the section's own fields nor the component's arguments."""
    params, _, var_kw = signature_params(target)
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in ("cls", "kwargs", "factory")]
    valid += [p for p in params if p not in runtime]
    for key in rest:
        if key not in params and not var_kw:
            problems.add(join(path, key), f"unknown option{did_you_mean(key, valid)}; valid "
                                          f"options: {', '.join(valid)}")


def _without(options: dict, section: str) -> dict:
    return {k: v for k, v in options.items() if k not in DLAS_NO_EFFECT.get(section, ())}


def _warn_dlas(options: dict, section: str, path: str | None = None) -> None:
    for key in DLAS_NO_EFFECT.get(section, ()):
        if key in options:
            log.warning("%s: DLAS option %r has no effect in this trainer; remove it",
                        join(path if path is not None else section, key), key)
