#!/usr/bin/env python
"""Framework overhead: ExtensibleTrainer.train() against a hand-written PyTorch loop.

Both sides train the same network (``toy_mlp`` from experiments/plugins/toy.py) from the same
initial weights on the same batches (in-memory tensors, no shuffle, no workers) in the same
order, with the same AdamW (decayed weights, undecayed biases/norms), the same gradient
clipping and the same number of steps. A few warm-up steps run untimed on both sides first.
Each measurement is repeated ``--repeats`` times, interleaved (plain, trainer, plain, ...),
and the medians are compared.

The trainer side is what users run: ``trainer.train()`` with TensorBoard logging every
``--print-freq`` steps and the final checkpoint. The final save and the logger's close are
one-off costs; they are timed separately (by wrapping ``trainer.save`` and
``trainer.logger.close``), so two ratios are reported:

- ``ratio_loop``: (train() minus the final save and logger close) / plain loop
- ``ratio_e2e``:  train() end to end / plain loop

Afterwards the final weights of both sides are compared (they should agree to float
rounding: same data, same init, same optimizer, fp32).

    python scripts/bench_overhead.py [--steps N] [--batch-size B] [--hidden H] [--repeats R]
                                     [--threads T] [--clip C] [--profile] [--verbose]

On a shared machine the run-to-run spread can exceed the overhead being measured; the script
then also prints the median of paired (adjacent-run) ratios, the ratio of the fastest runs and
the ratio of median per-step times, which resist other processes' bursts better. ``--profile``
adds a cProfile of one more run of each side (top functions, and the framework's own code).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "codebase"))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data import register_dataset
from models import MODELS
from trainer.config import validate_experiment
from trainer.extensible_trainer import ExtensibleTrainer
from utils.options import options_from_dict

TOY_PLUGIN = REPO / "experiments" / "plugins" / "toy.py"
NET = "mlp"


@register_dataset("bench_tensors")
class BenchTensors(Dataset):
    """``num_items`` fixed random (x, y) pairs held in memory; deterministic for a ``seed``."""

    batch_keys = ("x", "y")

    def __init__(
        self, num_items: int = 4096, in_dim: int = 256, out_dim: int = 64, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_items, in_dim, generator=g)
        w = torch.randn(in_dim, out_dim, generator=g) / in_dim**0.5
        self.y = torch.tanh(self.x @ w) + 0.05 * torch.randn(num_items, out_dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


# ----------------------------------------------------------------------------- configuration
def dataset_kwargs(args: argparse.Namespace) -> dict:
    return {
        "num_items": args.batch_size * args.batches_per_epoch,
        "in_dim": args.in_dim,
        "out_dim": args.out_dim,
        "seed": args.seed + 1,
    }


def model_kwargs(args: argparse.Namespace) -> dict:
    return {
        "in_dim": args.in_dim,
        "hidden": args.hidden,
        "out_dim": args.out_dim,
        "depth": args.depth,
        "dropout": 0.0,
    }


def experiment_dict(args: argparse.Namespace, run_dir: Path) -> dict:
    return {
        "name": "bench_overhead",
        "seed": args.seed,
        "device": "cpu",
        "precision": "fp32",
        "use_tb_logger": True,  # what users get by default
        "wandb": False,
        "plugins": [str(TOY_PLUGIN)],
        "datasets": {
            "train": {
                "mode": "bench_tensors",
                "batch_size": args.batch_size,
                "n_workers": 0,
                "shuffle": False,
                "drop_last": True,
                **dataset_kwargs(args),
            }
        },
        "networks": {
            NET: {"type": "generator", "which_model_G": "toy_mlp", "kwargs": model_kwargs(args)}
        },
        "steps": {
            "fit": {
                "training": NET,
                "optimizer": "adamw",
                "optimizer_params": {
                    "lr": args.lr,
                    "weight_decay": args.weight_decay,
                    "beta1": 0.9,
                    "beta2": 0.999,
                    "eps": 1e-8,
                },
                "clip_grad_eps": args.clip or None,
                "injectors": {
                    "pred": {"type": "generator", "generator": NET, "in": "x", "out": "pred"}
                },
                "losses": {"mse": {"type": "mse", "weight": 1.0, "fake": "pred", "real": "y"}},
            }
        },
        "path": {"root": str(run_dir)},
        "train": {"niter": args.warmup + args.steps, "default_lr_scheme": "Constant"},
        "logger": {
            "print_freq": args.print_freq,
            "save_checkpoint_freq": None,
            "progress_bar": False,
            "stdin_commands": False,
        },
    }


def quiet(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Swallow the trainer's console lines (one per print_freq steps) unless --verbose."""
    return contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- the two sides
def build_trainer(args: argparse.Namespace, run_dir: Path) -> ExtensibleTrainer:
    exp = validate_experiment(options_from_dict(experiment_dict(args, run_dir), run_dir))
    return ExtensibleTrainer(exp)


def run_trainer(
    args: argparse.Namespace, profile: cProfile.Profile | None = None
) -> dict[str, Any]:
    """Build (untimed), warm up (untimed), then time ``trainer.train()``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    try:
        with quiet(args):
            trainer = build_trainer(args, tmp / "run")
            init = clone_state(trainer.raw_networks[NET])
            oneoff = {"save": 0.0, "close": 0.0, "cpu": 0.0}

            def timed(key: str, fn: Any) -> Any:
                def wrapper(*a: Any, **kw: Any) -> Any:
                    t, c = time.perf_counter(), time.process_time()
                    try:
                        return fn(*a, **kw)
                    finally:
                        oneoff[key] += time.perf_counter() - t
                        oneoff["cpu"] += time.process_time() - c

                return wrapper

            stamps: list[float] = []  # end of each step's train_step (a step callback)
            trainer.step_callbacks.append(lambda step, logs: stamps.append(time.perf_counter()))
            trainer.save = timed("save", trainer.save)  # the final checkpoint
            trainer.logger.close = timed("close", trainer.logger.close)  # TensorBoard flush
            for _ in range(args.warmup):  # the body of train()'s loop, untimed
                batch = next(trainer.loader)
                trainer.step += 1
                trainer.env.step = trainer.step
                trainer.train_step(batch)
            gc.collect()
            if profile is not None:
                profile.enable()
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train()
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            if profile is not None:
                profile.disable()
        assert trainer.step == args.warmup + args.steps, trainer.step
        return {
            "total": total,
            "save": oneoff["save"],
            "close": oneoff["close"],
            "loop": total - oneoff["save"] - oneoff["close"],
            "init": init,
            "cpu": cpu - oneoff["cpu"],
            "step_times": step_times(t0, stamps),
            "final": clone_state(trainer.raw_networks[NET]),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_plain(
    args: argparse.Namespace, init: dict[str, torch.Tensor], profile: cProfile.Profile | None = None
) -> dict[str, Any]:
    """A hand-written loop over the same data with the same model, optimizer and clipping."""
    dataset = BenchTensors(**dataset_kwargs(args))
    model = MODELS.get("toy_mlp")(**model_kwargs(args))
    model.load_state_dict(init)
    model.train()
    # AdamW as the trainer builds it: weight decay on weight matrices only.
    decayed = {n for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("bias")}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    params = decay + no_decay
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, drop_last=True, num_workers=0
    )

    def batches():
        while True:
            yield from loader

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = F.mse_loss(model(batch["x"]), batch["y"])
        loss.backward()
        if args.clip:
            nn.utils.clip_grad_norm_(params, args.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    it = batches()
    for _ in range(args.warmup):
        step(next(it))
    gc.collect()
    losses, stamps = [], []
    if profile is not None:
        profile.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(1, args.steps + 1):
        loss = step(next(it))
        if i % args.print_freq == 0 or i == args.steps:  # a plain loop reports its loss too
            losses.append(loss.item())
        stamps.append(time.perf_counter())
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profile is not None:
        profile.disable()
    return {
        "total": total,
        "cpu": cpu,
        "final": clone_state(model),
        "step_times": step_times(t0, stamps),
    }


def step_times(t0: float, stamps: list[float]) -> list[float]:
    """Durations between consecutive step ends (the first from the start of timing)."""
    return [b - a for a, b in zip([t0] + stamps[:-1], stamps)]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def eval_loss(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> float:
    """MSE of a network with ``state`` on the first 1024 training items (the same for both)."""
    model = MODELS.get("toy_mlp")(**model_kwargs(args))
    model.load_state_dict(state)
    model.eval()
    ds = BenchTensors(**dataset_kwargs(args))
    with torch.no_grad():
        return F.mse_loss(model(ds.x[:1024]), ds.y[:1024]).item()


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512, help="toy_mlp hidden width")
    p.add_argument("--depth", type=int, default=3, help="toy_mlp hidden layers")
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=64)
    p.add_argument(
        "--batches-per-epoch",
        type=int,
        default=250,
        help="dataset size in batches (the loaders wrap around epochs)",
    )
    p.add_argument("--repeats", type=int, default=10, help="interleaved runs of each side")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="clip_grad_eps (0: no clipping)")
    p.add_argument("--print-freq", type=int, default=100, help="trainer logger.print_freq")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, cProfile one more run of each side and print the top items",
    )
    p.add_argument("--verbose", action="store_true", help="show the trainer's own console output")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def print_profile(title: str, prof: cProfile.Profile, steps: int, n: int = 20) -> None:
    """Top functions by own time, then the framework's own functions (codebase/) alone."""
    stats = pstats.Stats(prof).stats
    codebase = str(REPO / "codebase")
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    ours = [kv for kv in rows if kv[0][0].startswith(codebase)]
    total = sum(v[2] for v in stats.values())
    ours_us = sum(v[2] for _, v in ours) / steps * 1e6
    print(
        f"\n--- cProfile: {title}: {total:.3f} s profiled, {total / steps * 1e3:.3f} ms/step "
        f"(cProfile inflates Python-heavy code) ---"
    )
    for heading, items in (
        (f"top {n} by own time", rows[:n]),
        (f"framework code (codebase/): {ours_us:.0f} us/step own time in all", ours[:n]),
    ):
        print(f"  {heading}:")
        print(f"  {'own us/step':>11} {'cum us/step':>11} {'calls':>7}  function")
        for (file, line, name), (_cc, calls, tt, ct, _callers) in items:
            where = f"{Path(file).name}:{line}" if line else file
            print(
                f"  {tt / steps * 1e6:11.1f} {ct / steps * 1e6:11.1f} {calls:7d}  {name} ({where})"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    plain_t, loop_t, e2e_t, save_t, close_t = [], [], [], [], []
    plain_cpu: list[float] = []
    trainer_cpu: list[float] = []
    plain_steps: list[float] = []
    trainer_steps: list[float] = []
    diffs, plain_diffs = [], []
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    # A first build validates the setup, does the one-time imports (tensorboard ...) and gives
    # the initial weights the trainer draws from its seed; every later build must match them.
    with quiet(args), tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        init = clone_state(build_trainer(args, Path(tmp) / "run").raw_networks[NET])
    ref_plain = None
    for r in range(args.repeats):
        gc.collect()
        plain = run_plain(args, init)
        gc.collect()
        tr = run_trainer(args)
        if max_abs_diff(tr["init"], init) != 0.0:
            raise RuntimeError("the trainer's initial weights differ between builds (seeding?)")
        plain_t.append(plain["total"])
        loop_t.append(tr["loop"])
        e2e_t.append(tr["total"])
        save_t.append(tr["save"])
        close_t.append(tr["close"])
        plain_cpu.append(plain["cpu"])
        trainer_cpu.append(tr["cpu"])
        plain_steps += plain["step_times"]
        trainer_steps += tr["step_times"]
        diffs.append(max_abs_diff(tr["final"], plain["final"]))
        if ref_plain is None:
            ref_plain = plain
        else:
            plain_diffs.append(max_abs_diff(plain["final"], ref_plain["final"]))
        print(
            f"repeat {r + 1}/{args.repeats}: plain {plain['total']:.3f} s | trainer loop "
            f"{tr['loop']:.3f} s, train() {tr['total']:.3f} s (final save {tr['save']:.3f} s, "
            f"logger close {tr['close']:.3f} s) | max|dw| {diffs[-1]:.2e}",
            flush=True,
        )
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()[0]

    n_params = sum(v.numel() for v in init.values())
    med = statistics.median
    p_med, l_med, e_med = med(plain_t), med(loop_t), med(e2e_t)
    ratio_loop, ratio_e2e = l_med / p_med, e_med / p_med
    ratio_min = min(loop_t) / min(plain_t)
    ratio_step = med(trainer_steps) / med(plain_steps)
    ratio_paired = med([tl / pl for tl, pl in zip(loop_t, plain_t)])
    p10_plain, p10_trainer = quantile(plain_steps, 0.1), quantile(trainer_steps, 0.1)
    loss_plain = eval_loss(args, ref_plain["final"])
    loss_trainer = eval_loss(args, tr["final"])
    ms = 1e3 / args.steps

    print()
    print(
        f"overhead benchmark: ExtensibleTrainer.train() vs a plain PyTorch loop "
        f"(torch {torch.__version__}, cpu, {args.threads} threads)"
    )
    print(
        f"  steps {args.steps} (+{args.warmup} untimed warm-up) | batch {args.batch_size} | "
        f"params {n_params:,} (toy_mlp in {args.in_dim}, hidden {args.hidden} x{args.depth}, "
        f"out {args.out_dim}) | adamw, clip {args.clip or 'off'}, fp32 | print_freq "
        f"{args.print_freq}, tensorboard on | repeats {args.repeats}"
    )
    print(
        f"  {'':34} {'median s':>9} {'ms/step':>8} {'min s':>8} {'max s':>8} {'median step ms':>15}"
    )
    rows = [
        ("plain loop", plain_t, plain_steps),
        ("trainer loop (train() - one-offs)", loop_t, trainer_steps),
        ("trainer train() end to end", e2e_t, None),
        ("  one-off: final save", save_t, None),
        ("  one-off: logger close", close_t, None),
    ]
    for name, ts, steps in rows:
        per_step = f"{med(steps) * 1e3:15.3f}" if steps else ""
        print(
            f"  {name:34} {med(ts):9.3f} {med(ts) * ms:8.3f} {min(ts):8.3f} {max(ts):8.3f} "
            f"{per_step}"
        )
    print(
        f"  ratio_loop (trainer loop / plain, medians)   {ratio_loop:.4f}   "
        f"({(l_med - p_med) / args.steps * 1e6:+.0f} us/step)"
    )
    print(f"  ratio_e2e  (train() / plain, medians)        {ratio_e2e:.4f}")
    print(f"  median of paired ratios (adjacent runs)      {ratio_paired:.4f}")
    print(f"  ratio of fastest runs (loop)                 {ratio_min:.4f}")
    print(
        f"  ratio of median step times                   {ratio_step:.4f}   "
        f"({(med(trainer_steps) - med(plain_steps)) * 1e6:+.0f} us/step)"
    )
    print(
        f"  ratio of 10th-percentile step times          {p10_trainer / p10_plain:.4f}   "
        f"({(p10_trainer - p10_plain) * 1e6:+.0f} us/step)"
    )
    ratio_cpu = med(trainer_cpu) / med(plain_cpu)
    print(
        f"  ratio of CPU time (process_time, medians)    {ratio_cpu:.4f}   "
        f"(plain {med(plain_cpu):.3f} s, trainer loop {med(trainer_cpu):.3f} s)"
    )
    print(
        f"  target ratio_loop <= 1.05: {'PASS' if ratio_loop <= 1.05 else 'FAIL'} "
        f"(end to end: {'PASS' if ratio_e2e <= 1.05 else 'FAIL'})"
    )
    print(
        f"  same computation: max |w_trainer - w_plain| = {max(diffs):.3e}; "
        f"plain runs among themselves {max(plain_diffs, default=0.0):.3e}; "
        f"final mse (first 1024 items) plain {loss_plain:.6f}, trainer {loss_trainer:.6f}"
    )
    spread = max(max(plain_t) / min(plain_t), max(loop_t) / min(loop_t))
    print(f"  total wall time {wall:.1f} s; load average {load_before:.2f} -> {load_after:.2f}")
    if spread > 1.15:
        print(
            f"  WARNING: noisy machine (slowest/fastest run of a side = {spread:.2f}, other "
            "processes compete for the cores); the paired, fastest-run and per-step "
            "ratios are the more trustworthy figures; rerun on an idle machine for the medians"
        )

    if args.profile:
        prof_p, prof_t = cProfile.Profile(), cProfile.Profile()
        run_plain(args, init, prof_p)
        run_trainer(args, prof_t)
        print_profile("plain loop", prof_p, args.steps)
        print_profile("trainer.train()", prof_t, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
