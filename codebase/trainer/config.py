"""The experiment schema: one typed :class:`Experiment`, produced once by validation.

:func:`validate_experiment` walks the whole experiment (datasets, networks, steps with their
injectors and losses, the LR schedule, evaluators, the engine) and reports every problem at
once, before any tensor exists. Everything downstream reads the typed result; the options as
loaded are kept only to be written out (``config.yml``, checkpoints).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from data.spec import DatasetSpec, validate_dataset
from models import MODELS
from models.lora import LoraOptions, default_targets, match_targets
from trainer import components  # noqa: F401 - imports every built-in component family
from trainer.component import ComponentSpec, Gate
from trainer.engines import validate_engine_options
from trainer.evaluators import EVALUATORS
from trainer.freeze import ParamGroupSpec, check_step_patterns, validate_param_groups
from trainer.injectors import INJECTORS, GeneratorInjector
from trainer.losses import LOSSES
from trainer.lr_scheduler import SCHEDULERS
from trainer.optimizers import OPTIMIZERS
from utils.errors import CheckpointError
from utils.io import (
    ADAPTER_FORMAT,
    adapted,
    compare_weights,
    grow_rows,
    safetensors_metadata,
    weight_shapes,
)
from utils.options import import_plugins, load_cli, public
from utils.registry import Registry, did_you_mean
from utils.schema import (
    _MISSING,
    ConfigError,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Problems,
    Range,
    bind_options,
    bind_shared_section,
    build_dataclass,
    coerce,
    construct,
    is_mapping,
    join,
    lookup,
)

log = logging.getLogger(__name__)
Rate = Annotated[float, Range(0, 1, min_open=True, max_open=True)]  # strictly between 0 and 1

Precision = Literal["fp32", "bf16", "fp16"]

# DLAS keys that have no effect here: accepted (so DLAS files load) with a warning saying why.
DLAS_NO_EFFECT: dict[str, dict[str, str]] = {
    "": {
        "scale": "an image-model option",
        "start_step": "the step comes from the checkpoint that path.resume_state names",
        "distortion": "an image-model option",
        "dist": "distributed training follows torchrun (see the README)",
    },
    "logger": {"disable_state_saving": "checkpoints always hold the training state"},
    "eval": {
        "output_state": "validation runs the steps' own injectors and losses on datasets.val",
        "injectors": "validation runs the steps' own injectors and losses on datasets.val",
        "pure": "validation always runs on datasets.val when train.val_freq is set",
    },
    "steps.*": {"loss_log_buffer": "losses are averaged over logger.print_freq steps"},
}
SECTIONS = ("datasets", "networks", "steps", "path", "train", "eval", "logger", "deepspeed")
DLAS_SPELLINGS = {"fp16": bool | None, "gpu_ids": list[int] | None}


@dataclass
class TrainOptions:
    """``train:`` section (DLAS spelling). LR schedule options go to the chosen scheduler."""

    niter: PositiveInt  # number of optimizer steps in the whole run
    mega_batch_factor: PositiveInt = 1  # gradient accumulation: micro-batches per update
    val_freq: PositiveInt | None = None  # validate every N steps (needs datasets.val)
    default_lr_scheme: str = "Constant"  # MultiStepLR | CosineAnnealing | Constant
    ema_rate: Rate | None = None  # e.g. 0.999; keeps an EMA copy of every trainable network
    ema_enabled: bool | None = None  # DLAS: true without ema_rate means ema_rate 0.999
    max_nonfinite_streak: PositiveInt | None = (
        100  # stop after N steps in a row skipped (None: never)
    )
    # keep the checkpoint where this scalar was best: val/<loss> or eval/<scalar> (None: off)
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"  # min: lower is better (losses); max: higher
    # stop when best_metric has not improved for N measurements in a row (None: never)
    early_stop_patience: PositiveInt | None = None
    # Stop (after saving) when N training batches in a row ran out of memory: one long batch
    # is bad luck and skipped, a few in a row mean the batches do not fit (None: never stop).
    max_oom_streak: PositiveInt | None = 3
    scheduler_kwargs: dict = field(default_factory=dict, init=False)  # the schedule's options


@dataclass
class LoggerOptions:
    """``logger:`` section."""

    print_freq: PositiveInt = 100  # console line + TensorBoard scalars every N steps
    save_checkpoint_freq: PositiveInt | None = (
        None  # None: only at the end, on Ctrl-C and on `save`
    )
    keep_last: PositiveInt | None = None  # keep only the newest N checkpoints
    progress_bar: bool = True
    stdin_commands: bool = True  # `save`, `eval`, `quit` + Enter while training
    wandb_project: str | None = None  # default: the experiment name
    wandb_mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's default
    # DLAS: state keys drawn to TensorBoard (images/visuals/<key>) every visual_debug_rate steps
    visuals: list[str] = field(default_factory=list)
    visual_debug_rate: PositiveInt | None = None  # default: print_freq
    is_mel_spectrogram: bool = False  # draw the visuals as mel spectrograms


@dataclass
class PathOptions:
    """``path:`` section; ``pretrain_model_<net>`` keys are collected into ``pretrain``."""

    root: Path | None = None  # run folder; default: <experiment file's folder>/<name>
    resume_state: str | None = None  # "auto" or a training_state file
    strict_load: bool = True  # pretrain_model_* must match the network exactly
    # pretrain_model_* tensors with fewer rows than the network (a grown vocabulary or
    # codebook) keep their rows; new rows start at the mean of the old ones
    grow_embeddings: bool = False
    pretrain: dict[str, Path] = field(default_factory=dict, init=False)


@dataclass
class EvalOptions:
    """``eval:`` section: evaluators run every ``every`` steps (and on `eval`); ``at_start``
    also runs them and the validation once before the first step (a "before" figure)."""

    every: PositiveInt | None = None
    at_start: bool = False
    evaluators: list[ComponentSpec] = field(default_factory=list, init=False)


@dataclass
class NetworkSpec:
    """``networks.<name>``: ``which_model_G`` (or ``_D`` / plain ``which_model``) + ``kwargs``."""

    which_model: str
    type: Literal["generator", "discriminator"] = "generator"  # must agree with which_model_G/_D
    kwargs: dict = field(default_factory=dict)  # the factory's options (saved in checkpoints)
    trainable: bool = True
    lora: LoraOptions | None = None  # train low-rank adapters on the frozen network instead
    factory: Any = field(default=None, init=False)  # the registered model


@dataclass
class StepSpec:
    """``steps.<name>``: one optimizer over one network, fed by injectors and losses."""

    training: str  # the network this step trains
    optimizer: str = "adamw"
    optimizer_params: dict = field(default_factory=dict)  # the optimizer's options
    clip_grad_eps: PositiveFloat | None = None  # clip the gradient norm to this
    after: NonNegativeInt = 0
    before: NonNegativeInt | None = None
    every: PositiveInt = 1
    # fnmatch patterns of parameter names left untrained (requires_grad false, no optimizer)
    freeze: list[str] = field(default_factory=list)
    # optimizer options per pattern, over optimizer_params; the first matching entry wins
    param_groups: list[ParamGroupSpec] = field(default_factory=list, init=False)
    injectors: list[ComponentSpec] = field(default_factory=list, init=False)
    losses: list[ComponentSpec] = field(default_factory=list, init=False)
    trainable_summary: str = field(default="", init=False)  # freeze/param_groups: --dry-run log

    @property
    def gate(self) -> Gate:
        return Gate(self.after, self.before, self.every)


@dataclass
class Experiment:
    """A validated experiment."""

    name: str
    model: Literal["extensibletrainer"] = "extensibletrainer"
    seed: int | None = None
    device: str = "auto"
    engine: Literal["local", "deepspeed"] = "local"  # local: one process or DDP (torchrun)
    precision: Precision = "fp32"
    checkpointing_enabled: bool = False  # gradient checkpointing in networks that support it
    use_tb_logger: bool = True
    wandb: bool = False
    plugins: list[str] = field(default_factory=list)
    # the sections, validated
    datasets: dict[str, DatasetSpec] = field(default_factory=dict, init=False)
    networks: dict[str, NetworkSpec] = field(default_factory=dict, init=False)
    steps: dict[str, StepSpec] = field(default_factory=dict, init=False)
    train: TrainOptions = field(default=None, init=False)  # type: ignore[assignment]
    logger: LoggerOptions = field(default_factory=LoggerOptions, init=False)
    path: PathOptions = field(default_factory=PathOptions, init=False)
    eval: EvalOptions = field(default_factory=EvalOptions, init=False)
    deepspeed: Any = field(default=None, init=False)  # engine: deepspeed's options
    # where it came from
    file: str = field(default="", init=False)
    base_dir: Path = field(default=Path("."), init=False)
    options: dict = field(default_factory=dict, init=False)  # as loaded: written out, not read

    @property
    def run_dir(self) -> Path:
        return self.path.root or (self.base_dir / self.name)


def load_experiment_cli(args: Any) -> Experiment:
    """The validated experiment of a CLI's ``-opt``/``-o`` arguments; a bad file or option
    raises ``ConfigError`` (see :func:`utils.options.load_cli`)."""
    return load_cli(args, validate_experiment)


def validate_experiment(opt: dict) -> Experiment:
    """Check an options dict (from :func:`utils.options.load_options`); raise ConfigError with
    every problem found, or return the validated :class:`Experiment`."""
    source = opt.get("_file")
    base = Path(opt.get("_base_dir", "."))
    options = public(opt)
    problems = Problems()
    _warn_dlas(options, "")
    exp = build_dataclass(
        Experiment, _without(options, ""), "", problems, base, handled=(*SECTIONS, *DLAS_SPELLINGS)
    )
    if exp is None:
        problems.raise_if_any(source)
    exp.file, exp.base_dir, exp.options = str(source or ""), base, options
    _apply_dlas_spellings(exp, options, problems)
    try:
        import_plugins(exp.plugins, base)
    except ConfigError as e:
        problems.items.extend(e.problems)
    except Exception as e:  # a plugin that fails to import
        problems.add("plugins", f"importing a plugin failed: {type(e).__name__}: {e}")
    sections = {name: _section(options, name, problems) for name in SECTIONS}
    _validate_sections(exp, sections, problems)
    problems.raise_if_any(source)
    return exp


def _apply_dlas_spellings(exp: Experiment, options: dict, problems: Problems) -> None:
    """``fp16: true`` -> precision fp16; ``gpu_ids: [n]`` -> device cuda:n (unless set)."""
    values = {
        k: coerce(options[k], hint, k, problems, None)
        for k, hint in DLAS_SPELLINGS.items()
        if k in options
    }
    fp16 = values.get("fp16")
    if fp16 not in (None, _MISSING) and "precision" not in options:
        exp.precision = "fp16" if fp16 else "fp32"
    elif fp16 not in (None, _MISSING) and fp16 != (exp.precision == "fp16"):
        problems.add(
            "fp16",
            f"is {str(fp16).lower()} but precision is {exp.precision!r}: they disagree; keep "
            "one of them (precision: fp32 | bf16 | fp16)",
        )
    gpu_ids = values.get("gpu_ids")
    if gpu_ids not in (None, _MISSING) and gpu_ids and ("device" not in options):
        exp.device = f"cuda:{gpu_ids[0]}"
    _check_device(exp.device, "gpu_ids" if "device" not in options else "device", problems)


def _check_device(device: str, key: str, problems: Problems) -> None:
    """A CUDA device this machine has (checked before anything is built)."""
    try:
        dev = torch.device(device) if device != "auto" else None
    except (RuntimeError, ValueError):
        problems.add(key, f"{device!r} is not a device; use cpu, cuda, cuda:N or auto")
        return
    if dev is None or dev.type != "cuda":
        return
    cpu_hint = "to train on the CPU, add `-o device=cpu` (or set `device: cpu` / `auto`)"
    if not torch.cuda.is_available():
        problems.add(key, f"asks for {device} but this machine has no CUDA GPU; {cpu_hint}")
    elif dev.index is not None and dev.index >= torch.cuda.device_count():
        problems.add(
            key,
            f"asks for {device} but this machine has {torch.cuda.device_count()} GPU(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of them, or {cpu_hint}",
        )


def _section(options: dict, name: str, problems: Problems) -> dict:
    value = options.get(name)
    if value is None:
        return {}
    return value if is_mapping(value, name, problems) else {}


def _validate_sections(exp: Experiment, sections: dict[str, dict], problems: Problems) -> None:
    base = exp.base_dir
    if "train" not in exp.options:
        problems.add("train", "missing required section (needs at least niter)")
    exp.train = _validate_train(sections["train"], problems, base)
    _warn_dlas(sections["logger"], "logger")
    exp.logger = (
        build_dataclass(
            LoggerOptions, _without(sections["logger"], "logger"), "logger", problems, base
        )
        or LoggerOptions()
    )
    exp.path = _validate_path(sections["path"], exp, problems)
    exp.eval = _validate_eval(sections["eval"], problems, base)

    for phase, ds in sections["datasets"].items():
        exp.datasets[phase] = validate_dataset(phase, ds, problems, base)
    if "train" not in sections["datasets"]:
        problems.add("datasets.train", "missing required section")
    for name, net in sections["networks"].items():
        exp.networks[name] = _validate_network(name, net, problems, base)
    if not sections["networks"]:
        problems.add("networks", "missing: declare at least one network")
    loss_owner: dict[str, str] = {}
    for name, step in sections["steps"].items():
        exp.steps[name] = _validate_step(name, step, sections["networks"], problems, base)
        for loss in (step.get("losses") or {}) if isinstance(step, dict) else ():
            if loss in loss_owner:  # losses are logged by name: two steps may not share one
                problems.add(
                    f"steps.{name}.losses.{loss}",
                    f"a loss called {loss!r} is already "
                    f"declared in steps.{loss_owner[loss]}; loss names must be unique",
                )
            loss_owner[loss] = name
    if not sections["steps"]:
        problems.add("steps", "missing: declare at least one training step")
    _check_parameter_patterns(exp, problems)
    _check_pretrained(exp, problems)
    exp.deepspeed = validate_engine_options(exp.engine, sections["deepspeed"], exp, problems)
    for name, spec in exp.networks.items():
        if spec is not None and spec.lora is not None and exp.engine == "deepspeed":
            problems.add(
                f"networks.{name}.lora",
                "is not supported with engine: deepspeed (its checkpoints hold whole networks); "
                "use engine: local (DDP under torchrun)",
            )
    t = exp.train
    if t is not None and t.val_freq and "val" not in sections["datasets"]:
        problems.add("train.val_freq", "is set but there is no datasets.val to validate on")
    _validate_best(exp, sections, list(loss_owner), problems)


def _validate_best(
    exp: Experiment, sections: dict[str, dict], losses: list[str], problems: Problems
) -> None:
    """``train.best_metric`` names something measured: ``val/<loss>`` needs that loss,
    datasets.val and train.val_freq; ``eval/<scalar>`` needs an evaluator and eval.every (its
    scalar names are known only when the evaluators first run: checked then)."""
    t, key = exp.train, "train.best_metric"
    if t is None:
        return
    if t.best_metric is None:
        for option in ("best_mode", "early_stop_patience"):
            if sections["train"].get(option) is not None:
                problems.add(
                    f"train.{option}",
                    "is set but train.best_metric is not; name the scalar to track "
                    "(val/<loss> or eval/<scalar>)",
                )
        return
    metric = t.best_metric
    kind, _, name = metric.partition("/")
    val_names = [f"val/{loss}" for loss in losses]
    if kind == "val":
        if name not in losses:
            problems.add(
                key,
                f"{metric!r} names no loss{did_you_mean(metric, val_names)}; validation "
                f"logs {', '.join(val_names) or '(no losses)'}",
            )
        if "val" not in sections["datasets"]:
            problems.add(key, f"{metric!r} is measured by validation: add datasets.val")
        if not t.val_freq:
            problems.add(key, f"{metric!r} is measured by validation: set train.val_freq")
    elif kind == "eval" and name:
        if not exp.eval.evaluators:
            problems.add(key, f"{metric!r} is an evaluator's scalar: add eval.evaluators")
        if not exp.eval.every:
            problems.add(key, f"{metric!r} is an evaluator's scalar: set eval.every")
        names = [spec.name for spec in exp.eval.evaluators]
        owner = name.partition("/")[0] if "/" in name else None
        if len(names) > 1 and owner not in names:
            problems.add(
                key,
                f"{metric!r}: with several evaluators ({', '.join(names)}) their scalars are "
                f"logged as eval/<evaluator>/<scalar>, e.g. eval/{names[0]}/{name}",
            )
        elif len(names) == 1 and owner == names[0]:
            problems.add(
                key,
                f"{metric!r}: with one evaluator its scalars are logged as eval/<scalar>: "
                f"eval/{name.partition('/')[2]}",
            )
    else:
        problems.add(
            key,
            f"is {metric!r}{did_you_mean(metric, val_names)}; it must be val/<loss> (one of "
            f"{', '.join(val_names) or '(no losses)'}) or eval/<scalar> (an evaluator's, "
            "e.g. eval/tf_loss_mel)",
        )


def _validate_train(train: dict, problems: Problems, base: Path) -> TrainOptions | None:
    """``train:`` holds the trainer's own options and the LR schedule's options."""
    scheme = train.get("default_lr_scheme", TrainOptions.default_lr_scheme)
    sched = lookup(SCHEDULERS, scheme, "train.default_lr_scheme", problems)
    if sched is None:
        opts = build_dataclass(
            TrainOptions,
            {k: v for k, v in train.items() if k in TrainOptions.__dataclass_fields__},
            "train",
            problems,
            base,
        )
    else:
        opts, kwargs = bind_shared_section(TrainOptions, sched, train, "train", problems, base)
        if opts is not None:
            opts.scheduler_kwargs = kwargs
    if opts is not None and opts.ema_enabled is not None:
        if opts.ema_enabled and opts.ema_rate is None:
            opts.ema_rate = 0.999  # DLAS's default rate
        elif not opts.ema_enabled and opts.ema_rate is not None:
            problems.add(
                "train.ema_enabled",
                f"is false but train.ema_rate is {opts.ema_rate}: they disagree; keep one of them",
            )
    warmup = opts.scheduler_kwargs.get("warmup_iter") if opts is not None else None
    if isinstance(warmup, int) and warmup >= opts.niter:
        problems.add(
            "train.warmup_iter",
            f"is {warmup}, not fewer than train.niter ({opts.niter}): the whole run would be "
            "warm-up; lower it (or raise niter)",
        )
    return opts


def _validate_path(section: dict, exp: Experiment, problems: Problems) -> PathOptions:
    path = dict(section)
    pretrain = {}
    networks = exp.options.get("networks") or {}
    for key in [k for k in path if k.startswith("pretrain_model_")]:
        net = key[len("pretrain_model_") :]
        value = path.pop(key)
        if net not in networks:
            problems.add(
                f"path.{key}",
                _no_network(net, networks),
            )
        elif value is not None:
            pretrain[net] = coerce(value, Path, f"path.{key}", problems, exp.base_dir)
    resume = path.get("resume_state")
    if isinstance(resume, str) and resume != "auto":
        path["resume_state"] = str(exp.base_dir / Path(resume).expanduser())
    opts = build_dataclass(PathOptions, path, "path", problems, exp.base_dir) or PathOptions()
    opts.pretrain = pretrain
    return opts


def _check_pretrained(exp: Experiment, problems: Problems) -> None:
    """``pretrain_model_<net>`` files exist and are readable; a network file written by this
    trainer must hold the same model as the network it initialises."""
    for net, path in exp.path.pretrain.items():
        where = f"path.pretrain_model_{net}"
        if not isinstance(path, Path):  # its type was already reported
            continue
        if not path.is_file():
            problems.add(where, f"{path} does not exist")
            continue
        if path.suffix != ".safetensors":  # .pth/.pt: read when loaded (weights only)
            continue
        try:
            meta = safetensors_metadata(path)
        except CheckpointError as e:
            problems.add(where, str(e))
            continue
        if meta.get("format") == ADAPTER_FORMAT:
            problems.add(
                where,
                f"{path} holds LoRA adapters, not a network: point it at their base, or merge "
                f"them first (python -m models.lora merge --lora {path} --out merged.safetensors)",
            )
            continue
        spec = exp.networks.get(net)
        saved = meta.get("which_model")
        if spec is not None and saved is not None and saved != spec.which_model:
            problems.add(
                where,
                f"{path} holds a {saved!r} network, but networks.{net} is a "
                f"{spec.which_model!r}; point it at a {spec.which_model!r} checkpoint",
            )
        elif spec is not None and exp.path.strict_load:
            differ = _shape_mismatches(spec, path, exp.path.grow_embeddings)
            if differ:
                saved_kwargs = f" (it was saved with kwargs {meta['kwargs']})" if saved else ""
                problems.add(
                    where,
                    f"{path} does not fit networks.{net}: {len(differ)} tensor(s) differ, e.g. "
                    f"{'; '.join(differ[:3])}. Make networks.{net}.kwargs match the file"
                    f"{saved_kwargs}, or set path.strict_load: false to load the tensors "
                    f"that fit",
                )


def _shape_mismatches(spec: NetworkSpec, path: Path, grow: bool = False) -> list[str]:
    """The tensors of a safetensors file whose shape differs from the network's, or that the
    network lacks, read from the file's header against the network built on the meta device
    (nothing is allocated). Empty when the network cannot be built there. With ``grow``,
    tensors the load would grow (``path.grow_embeddings``) fit."""
    net = _on_meta(spec, str(path))
    if net is None:
        return []
    try:
        shapes = adapted(net, weight_shapes(path))
        if grow:
            shapes, _ = grow_rows(net, shapes)
        report = compare_weights(net, shapes)
    except Exception as e:  # checked when the weights are loaded instead
        log.debug("%s: shapes not checked on the meta device: %s", path, e)
        return []
    # Missing keys are left to the load: on the meta device tied tensors cannot be told apart.
    return report.mismatched + [f"{k}: not in the network" for k in report.unexpected]


def _on_meta(spec: NetworkSpec, what: str) -> Any:
    """The network built on the meta device (nothing allocated); None if it cannot be (an op
    that meta tensors lack, or options already reported): checked later on the real one."""
    if spec.factory is None:
        return None
    try:
        with torch.device("meta"):
            return construct(spec.factory, spec.kwargs, {}, "")
    except Exception as e:
        log.debug("%s: not checked on the meta device: %s", what, e)
        return None


def _check_parameter_patterns(exp: Experiment, problems: Problems) -> None:
    """Each step's ``freeze`` and ``param_groups`` against its network's parameter names."""
    built: dict[str, Any] = {}

    def meta_network(name: str) -> Any:
        if name not in built:
            spec = exp.networks.get(name)
            built[name] = _on_meta(spec, f"networks.{name}") if spec is not None else None
        return built[name]

    check_step_patterns(exp.steps, meta_network, problems)


def _validate_eval(section: dict, problems: Problems, base: Path) -> EvalOptions:
    _warn_dlas(section, "eval")  # DLAS's eval injectors: validation here runs the steps' losses
    section = _without(section, "eval")
    opts = (
        build_dataclass(EvalOptions, section, "eval", problems, base, handled=("evaluators",))
        or EvalOptions()
    )
    evaluators = section.get("evaluators") or {}
    if is_mapping(evaluators, "eval.evaluators", problems):
        for name, ev in evaluators.items():
            spec = validate_component(
                EVALUATORS, ev, f"eval.evaluators.{name}", name, problems, base, shared=()
            )
            if spec:
                opts.evaluators.append(spec)
    return opts


def _validate_network(name: str, net: Any, problems: Problems, base: Path) -> NetworkSpec | None:
    path = f"networks.{name}"
    before = len(problems.items)
    if not is_mapping(net, path, problems):
        return None
    net = dict(net)
    which = [k for k in ("which_model_G", "which_model_D", "which_model") if k in net]
    if len(which) != 1:
        problems.add(
            path,
            "set exactly one of which_model_G (generator), which_model_D "
            f"(discriminator) or which_model; found {which or 'none'}",
        )
        return None
    model = net.pop(which[0])
    net["which_model"] = model
    spec = build_dataclass(NetworkSpec, net, path, problems, base)
    implied = {"which_model_G": "generator", "which_model_D": "discriminator"}.get(which[0])
    if spec is not None and implied and "type" in net and spec.type != implied:
        problems.add(
            f"{path}.type",
            f"is {spec.type!r} but the network is declared with "
            f"{which[0]} (a {implied}); make them agree",
        )
    factory = lookup(MODELS, model, f"{path}.{which[0]}", problems)
    if spec is None or factory is None:
        return spec
    spec.factory = factory
    spec.kwargs = bind_options(factory, spec.kwargs, f"{path}.kwargs", problems, base_dir=base)
    if len(problems.items) == before:
        built = _check_by_building(spec, path, problems)
        if spec.lora is not None and built is not None:
            _check_lora(spec, built, path, problems)
    if spec.lora is not None and not spec.trainable:
        problems.add(f"{path}.lora", "is set but trainable is false: the adapters would not train")
    return spec


def _check_by_building(spec: NetworkSpec, path: str, problems: Problems) -> Any:
    """Run the network's own checks (e.g. heads dividing the width) now, with every other
    problem: build it on the meta device, which allocates nothing. Returns the meta network
    (None when it could not be built there)."""
    try:
        with torch.device("meta"):
            return construct(spec.factory, spec.kwargs, {}, path)
    except (ValueError, TypeError) as e:
        problems.add(f"{path}.kwargs", str(e))
    except Exception as e:  # not the options' fault (an op meta tensors lack): built later
        log.debug("%s: not checked on the meta device: %s", path, e)
    return None


def _check_lora(spec: NetworkSpec, net: Any, path: str, problems: Problems) -> None:
    """Every ``lora.target`` pattern (or the model's default) selects a module LoRA adapts."""
    where = f"{path}.lora.target"
    if spec.lora.target == []:
        problems.add(where, "is empty: give fnmatch patterns, or leave it out for the defaults")
        return
    patterns = spec.lora.target if spec.lora.target is not None else default_targets(net)
    if not patterns:
        names = [n for n, _ in net.named_modules() if n][:5]
        problems.add(
            where,
            f"required: {spec.which_model!r} declares no default lora_targets; give fnmatch "
            f"patterns of its module names (e.g. {', '.join(names)})",
        )
        return
    for i, message in match_targets(net, patterns)[1]:
        problems.add(f"{where}[{i}]" if spec.lora.target is not None else where, message)


def _validate_step(
    name: str, step: Any, networks: dict, problems: Problems, base: Path
) -> StepSpec | None:
    path = f"steps.{name}"
    if not is_mapping(step, path, problems):
        return None
    _warn_dlas(step, "steps.*", path)
    spec = build_dataclass(
        StepSpec,
        _without(step, "steps.*"),
        path,
        problems,
        base,
        handled=("injectors", "losses", "param_groups"),
    )
    if spec is None:
        return None
    if spec.training not in networks:
        problems.add(
            f"{path}.training",
            _no_network(spec.training, networks),
        )
    opt_factory = lookup(OPTIMIZERS, spec.optimizer, f"{path}.optimizer", problems)
    if opt_factory is not None:
        spec.optimizer_params = bind_options(
            opt_factory, spec.optimizer_params, f"{path}.optimizer_params", problems, base_dir=base
        )
    spec.param_groups = validate_param_groups(
        step.get("param_groups"), opt_factory, path, problems, base
    )
    if not step.get("losses"):
        problems.add(f"{path}.losses", "missing: a training step needs at least one loss")
    kinds = (("injectors", INJECTORS, INJECTOR_SHARED), ("losses", LOSSES, LOSS_SHARED))
    for key, registry, shared in kinds:
        section = step.get(key) or {}
        if not is_mapping(section, f"{path}.{key}", problems):
            continue
        for name, options in section.items():
            c = validate_component(
                registry, options, f"{path}.{key}.{name}", name, problems, base, shared
            )
            if c:
                getattr(spec, key).append(c)
                _check_network_names(c, networks, problems)
    return spec


def _check_network_names(spec: ComponentSpec, networks: dict, problems: Problems) -> None:
    """An injector's ``generator`` (and for_each's sub-injector's) must name a network."""
    nested = [v for v in spec.kwargs.values() if isinstance(v, ComponentSpec)]
    for inner in nested:
        _check_network_names(inner, networks, problems)
    name = spec.kwargs.get("generator")
    if issubclass(spec.cls, GeneratorInjector) and name not in networks:
        problems.add(
            f"{spec.path}.generator",
            _no_network(name, networks),
        )


# Options shared by every component of a kind (besides `type`), with their types.
INJECTOR_SHARED = ("in", "out", "train", "eval", "after", "before", "every")
LOSS_SHARED = ("weight", "after", "before", "every")
_SHARED_TYPES = {
    "in": str | list[str] | dict[str, str],
    "out": str | list[str],
    "train": bool,
    "eval": bool,
    "after": NonNegativeInt,
    "before": NonNegativeInt | None,
    "every": PositiveInt,
    "weight": float,
}


def validate_component(
    registry: Registry,
    options: Any,
    path: str,
    name: str,
    problems: Problems,
    base: Path,
    shared: tuple[str, ...],
) -> ComponentSpec | None:
    if not is_mapping(options, path, problems):
        return None
    if "type" not in options:
        problems.add(
            f"{path}.type",
            f"missing required option; registered {registry.kind}s: {', '.join(registry.names())}",
        )
        return None
    cls = lookup(registry, options["type"], f"{path}.type", problems)
    if cls is None:
        return None
    common = {}
    for key in shared:
        if key in options:
            value = coerce(options[key], _SHARED_TYPES[key], f"{path}.{key}", problems, base)
            if value is not _MISSING:
                common[key] = value
    own = {k: v for k, v in options.items() if k not in shared and k != "type"}
    kwargs = cls.check_options(own, path, problems, base)
    return component_spec(name, path, cls, kwargs, common)


def component_spec(name: str, path: str, cls: Any, kwargs: dict, common: dict) -> ComponentSpec:
    """A spec with the shared options (as in the YAML) in their one normalised form."""
    raw_in, raw_out = common.get("in", []), common.get("out", [])
    return ComponentSpec(
        name=name,
        path=path,
        cls=cls,
        kwargs=kwargs,
        gate=Gate(common.get("after", 0), common.get("before"), common.get("every", 1)),
        inputs=_keys(raw_in),
        input_map=dict(raw_in) if isinstance(raw_in, dict) else None,
        outputs=_keys(raw_out),
        train=common.get("train", True),
        eval=common.get("eval", True),
        weight=common.get("weight", 1.0),
    )


def _no_network(name: Any, networks: dict) -> str:
    """The message for a name that is not one of the declared networks."""
    return (
        f"no network called {name!r}{did_you_mean(name, networks)}; networks: "
        f"{', '.join(networks) or '(none)'}"
    )


def _keys(value: str | list[str] | dict[str, str]) -> list[str]:
    if isinstance(value, dict):
        return list(value.values())
    return [value] if isinstance(value, str) else list(value)


def _without(options: dict, section: str) -> dict:
    return {k: v for k, v in options.items() if k not in DLAS_NO_EFFECT.get(section, ())}


def _warn_dlas(options: dict, section: str, path: str | None = None) -> None:
    for key, why in DLAS_NO_EFFECT.get(section, {}).items():
        if key in options:
            log.warning(
                "%s: DLAS option %r has no effect here (%s); remove it",
                join(path if path is not None else section, key),
                key,
                why,
            )
