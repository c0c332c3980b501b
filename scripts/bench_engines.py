#!/usr/bin/env python
"""Training throughput and peak memory of the local engine vs DeepSpeed ZeRO, on VALL-E.

    python scripts/bench_engines.py [--size tiny|small|reference] [--zero-stage 2]
                                    [--zero-stages 1,2] [--precision bf16] [--batch 8] [--steps 10]

Each engine trains the registered ``valle`` network (AdamW, clip 1.0) on the same synthetic
batch (see bench_train.py) through the calls ConfigurableStep makes: ``prepare``,
``autocast``, ``backward``, ``step``. One process, so ZeRO shards nothing here: the figures
show the engine's own overhead and memory layout; run it under torchrun/deepspeed with N GPUs
to see ZeRO's sharding (each rank prints its own table). Prints steps/s, tokens/s and (CUDA)
``torch.cuda.max_memory_allocated`` less what was allocated before the engine's run (so memory
a previous engine left behind is not counted), with DeepSpeed / local ratios. ``--zero-stages
1,2`` runs DeepSpeed once per stage (rows ``zero-1``, ``zero-2``) instead of once at
``--zero-stage``. ``--size tiny`` on CPU checks that it works in seconds.
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch

from bench_train import SIZES, add_workload_args, batch, timed  # noqa: E402 - also puts codebase/ on sys.path
from models import build_network
from trainer.engines import Engine, LocalEngine
from utils import distributed
from utils.distributed import resolve_device

SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, n_levels=2, codebook_size=64, n_phonemes=64),
    **SIZES,
}


def make_engine(
    name: str,
    device: torch.device,
    precision: str,
    dist: distributed.DistInfo,
    zero_stage: int,
    micro_batch: int,
) -> Engine:
    if name == "local":
        return LocalEngine(device, precision, dist)
    from trainer.engines.deepspeed import DeepSpeedEngine, DeepSpeedOptions

    return DeepSpeedEngine(
        device, precision, dist, DeepSpeedOptions(zero_stage=zero_stage), micro_batch
    )


def run(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
    dist: distributed.DistInfo,
    zero_stage: int,
) -> dict[str, float]:
    """Train ``args.steps`` timed steps (after 2 warm-up steps) with one engine."""
    torch.manual_seed(0)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    cfg = dict(SIZES[args.size], dropout=0.1, checkpointing=args.checkpointing)
    model = build_network("valle", cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = make_engine(name, device, precision, dist, zero_stage, args.batch)
    net = engine.prepare("valle", model, opt, clip=1.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    data = batch(cfg, args.batch, args.target_frames, args.prompt_frames, args.phonemes, device)

    def step() -> None:
        with engine.no_sync(net, skip_sync=False), engine.autocast():
            out = net(**data)
            loss = out["loss_ar"] + out["loss_nar"]
        engine.backward(net, loss)
        engine.step(net, opt, params, 1.0)

    elapsed = timed(step, args.steps, device)
    seq = args.phonemes + args.prompt_frames + args.target_frames
    tokens = 2 * seq * args.batch * args.steps  # AR pass + NAR pass, as in bench_train.py
    result = {
        "params_m": n_params / 1e6,
        "steps_per_s": args.steps / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_gib": (
            (torch.cuda.max_memory_allocated(device) - before) / 2**30
            if device.type == "cuda"
            else float("nan")
        ),
    }
    return result


def release(device: torch.device) -> None:
    """Free the previous engine's memory so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--engines", default="local,deepspeed", help="comma-separated, in order")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=2)
    p.add_argument(
        "--zero-stages",
        default=None,
        help="comma-separated ZeRO stages, e.g. 1,2: one DeepSpeed run per stage "
        "(rows zero-1, zero-2); overrides --zero-stage",
    )
    add_workload_args(p)
    args = p.parse_args()
    try:
        stages = (
            [int(x) for x in args.zero_stages.split(",") if x.strip()]
            if args.zero_stages
            else [args.zero_stage]
        )
    except ValueError:
        stages = []
    if not stages or any(z not in (0, 1, 2) for z in stages):
        p.error(f"--zero-stages takes stages 0, 1 and 2, got {args.zero_stages!r}")
    torch.set_num_threads(args.threads)
    device_type = resolve_device(args.device, distributed.DistInfo(0, 0, 1)).type
    dist = distributed.init_distributed(device_type)  # under torchrun: one row per rank
    device = resolve_device(args.device, dist)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    runs = [(n, 0) for n in names if n != "deepspeed"]
    if "deepspeed" in names:  # in the order given, one row per stage
        at = names.index("deepspeed")
        ds_runs = [("deepspeed" if len(stages) == 1 else f"zero-{z}", z) for z in stages]
        runs = runs[:at] + ds_runs + runs[at:]
    results = {}
    for label, stage in runs:
        results[label] = run(
            "local" if label == "local" else "deepspeed", args, device, precision, dist, stage
        )
        release(device)

    seq = args.phonemes + args.prompt_frames + args.target_frames
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    first = next(iter(results.values()))
    print(
        f"valle {args.size}: {first['params_m']:.1f}M parameters, {device} ({where}), "
        f"{precision}, batch {args.batch} x {seq} positions, rank {dist.rank} of "
        f"{dist.world_size}, deepspeed ZeRO-{','.join(map(str, stages))}"
    )
    print(f"  {'engine':<10} {'steps/s':>9} {'tokens/s':>12} {'peak GiB':>9}")
    for name, r in results.items():
        print(
            f"  {name:<10} {r['steps_per_s']:>9.2f} {r['tokens_per_s']:>12,.0f} "
            f"{r['peak_gib']:>9.2f}"
        )
    local = results.get("local")
    for label, ds in results.items():
        if local is None or label == "local":
            continue
        memory = (
            f", peak memory {ds['peak_gib'] / local['peak_gib']:.2f}x"
            if device.type == "cuda"
            else ""
        )
        print(
            f"  {label} / local: throughput {ds['tokens_per_s'] / local['tokens_per_s']:.2f}x"
            f"{memory}"
        )


if __name__ == "__main__":
    main()
