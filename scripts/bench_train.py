#!/usr/bin/env python
"""VALL-E training throughput: tokens/s and (on a GPU) model FLOPs utilisation.

    python scripts/bench_train.py [--size small|reference] [--device auto] [--precision bf16]
                                  [--batch 8] [--target-frames 300] [--steps 10]
                                  [--peak-tflops 989]

Trains the registered ``valle`` network on random batches of realistic shape (phonemes,
a 3 s prompt, the target) with AdamW, the way a training step does (AR + NAR losses, backward,
clip, step). Tokens are the positions the transformer processes per item: phonemes + prompt +
target, for the AR and the NAR pass each. MFU = achieved FLOPs / the device's peak, with
FLOPs ~ 6 x parameters x tokens + attention (12 x layers x d_model x seq^2 per sequence).
The peak is the dense bf16 figure of the GPU's datasheet, looked up by the name
``torch.cuda.get_device_name()`` reports (``PEAK_TFLOPS`` below); ``--peak-tflops`` or the
environment variable ``PEAK_TFLOPS`` set it for a GPU the table lacks (or another precision).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "codebase"))

import torch

import trainer.components  # noqa: E402,F401 - registers the models
from models import build_network
from models.audio.tts.valle import REFERENCE_CONFIG
from utils.distributed import DistInfo, resolve_device

SIZES = {
    "small": dict(
        d_model=256, n_layers=4, n_heads=4, n_levels=4, codebook_size=256, n_phonemes=128
    ),
    "reference": REFERENCE_CONFIG,
}
# Dense bf16 TFLOP/s (datasheets, without sparsity), matched as a substring of the device
# name, first match wins: the PCIe H100 has fewer SMs and a lower clock than the SXM one.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_flops(
    device: torch.device, override_tflops: float | None = None
) -> tuple[float, str] | None:
    """(peak FLOP/s, where the figure comes from), or None when unknown (no MFU printed)."""
    if override_tflops is None and os.environ.get("PEAK_TFLOPS"):
        override_tflops = float(os.environ["PEAK_TFLOPS"])
    if override_tflops is not None:
        return override_tflops * 1e12, "given"
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"dense bf16 peak of {key}"
    return None


def batch(cfg: dict, b: int, target: int, prompt: int, phonemes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    lv, k = cfg["n_levels"], cfg["codebook_size"]
    return {
        "phonemes": torch.randint(3, cfg["n_phonemes"], (b, phonemes), generator=g).to(device),
        "phoneme_lengths": torch.full((b,), phonemes, device=device),
        "prompt": torch.randint(0, k, (b, lv, prompt), generator=g).to(device),
        "prompt_lengths": torch.full((b,), prompt, device=device),
        "codes": torch.randint(0, k, (b, lv, target), generator=g).to(device),
        "code_lengths": torch.full((b,), target, device=device),
    }


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after two warm-up calls (allocator, kernels);
    peak-memory statistics are reset after the warm-up."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The synthetic VALL-E workload's options, shared with bench_engines.py."""
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="default: bf16 on cuda, fp32 on cpu",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--target-frames", type=int, default=300)
    p.add_argument("--prompt-frames", type=int, default=120)
    p.add_argument("--phonemes", type=int, default=80)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="small")
    add_workload_args(p)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS env, then the "
        "table of known GPUs)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, DistInfo(0, 0, 1))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    cfg = dict(SIZES[args.size], dropout=0.1, checkpointing=args.checkpointing)
    model = build_network("valle", cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = batch(cfg, args.batch, args.target_frames, args.prompt_frames, args.phonemes, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            out = model(**data)
            loss = out["loss_ar"] + out["loss_nar"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    elapsed = timed(step, args.steps, device)
    seq = args.phonemes + args.prompt_frames + args.target_frames
    tokens = 2 * seq * args.batch * args.steps  # AR pass + NAR pass
    flops = (
        6 * n_params * tokens
        + 12 * cfg["n_layers"] * cfg["d_model"] * seq**2 * 2 * args.batch * args.steps
    )
    print(
        f"valle {args.size}: {n_params / 1e6:.1f}M parameters, {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{precision}, batch {args.batch} x {seq} positions, checkpointing "
        f"{args.checkpointing}"
    )
    print(
        f"  {args.steps / elapsed:.2f} steps/s | {tokens / elapsed:,.0f} tokens/s | "
        f"{args.batch * args.target_frames * args.steps / elapsed:,.0f} target frames/s"
    )
    peak = peak_flops(device, args.peak_tflops)
    if peak:
        print(
            f"  model FLOPs utilisation: {flops / elapsed / peak[0] * 100:.1f}% of "
            f"{peak[0] / 1e12:.0f} TFLOP/s ({peak[1]}); achieved {flops / elapsed / 1e12:.1f} "
            "TFLOP/s"
        )
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
