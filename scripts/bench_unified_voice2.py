"""Cost of one unified_voice2 training step (forward + backward + AdamW), with gradient
checkpointing off and on.

    python scripts/bench_unified_voice2.py --size seed   # 421M parameters; about 7 GB of RAM
    python scripts/bench_unified_voice2.py --size tiny
    python scripts/bench_unified_voice2.py --size seed --device cuda --precision bf16 \
        --batch 32 --text 200 --codes 250                 # the seed's micro-batch (128 / 4)

Default batch 1: 100 text tokens, 200 mel codes, 2 conditioning clips of 1 s (87 mel frames).
Each setting runs in its own process, so its peak memory is its own: RSS (ru_maxrss) on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "codebase"))

import torch

from models.audio.tts.unified_voice2 import UnifiedVoice2

SIZES = {
    "seed": dict(layers=30, model_dim=1024, heads=16, max_text_tokens=402, max_mel_tokens=604),
    "tiny": dict(layers=2, model_dim=64, heads=4, max_text_tokens=402, max_mel_tokens=604),
}


def one(
    size: str,
    checkpointing: bool,
    steps: int,
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 1,
    text_len: int = 100,
    codes_len: int = 200,
) -> dict:
    """Time ``steps`` training steps after one warm-up step (which allocates AdamW's state)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = UnifiedVoice2(**SIZES[size], max_conditioning_inputs=2, checkpointing=checkpointing)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cond = torch.randn(batch, 2, 80, 87, device=dev)
    text = torch.randint(1, 255, (batch, text_len), device=dev)
    codes = torch.randint(0, 8192, (batch, codes_len), device=dev)
    lengths = (torch.full((batch,), text_len), torch.full((batch,), codes_len * 1024))
    args = (cond, text, lengths[0].to(dev), codes, lengths[1].to(dev))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    cuda = dev.type == "cuda"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss_text, loss_mel, _ = model(*args)
        (0.01 * loss_text + loss_mel).float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "checkpointing": checkpointing,
        "step_s": min(times[1:]),
        "first_step_s": times[0],
        "rss_after_build_gib": rss0,
        "peak_gib": (
            torch.cuda.max_memory_allocated() / 2**30
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        ),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text", type=int, default=100, help="text tokens per item")
    p.add_argument("--codes", type=int, default=200, help="mel codes per item")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = (args.device, args.precision, args.batch, args.text, args.codes)
    if args.one:
        print(json.dumps(one(args.size, args.one == "on", args.steps, *work)))
        return 0
    rows = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads), "--device", args.device]
        cmd += ["--precision", args.precision, "--batch", str(args.batch)]
        cmd += ["--text", str(args.text), "--codes", str(args.codes), "--one", setting]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    memory = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"unified_voice2 --size {args.size}: {rows[0]['params']:,} parameters, batch "
        f"{args.batch} (text {args.text}, mel {args.codes}, 2 clips x 87 frames), "
        f"{args.device} {args.precision}, {torch.get_num_threads()} threads"
    )
    print(f"checkpointing  step (s)  first step (s)  {memory} (GiB)")
    for r in rows:
        print(
            f"{'on' if r['checkpointing'] else 'off':<13}  {r['step_s']:8.2f}  "
            f"{r['first_step_s']:14.2f}  {r['peak_gib']:8.2f}"
        )
    print(f"time ratio on/off: {rows[1]['step_s'] / rows[0]['step_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
