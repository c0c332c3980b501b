"""CPU cost of one unified_voice2 training step (forward + backward + AdamW), with gradient
checkpointing off and on.

    python scripts/bench_unified_voice2.py --size seed   # 421M parameters; about 7 GB of RAM
    python scripts/bench_unified_voice2.py --size tiny

Batch 1: 100 text tokens, 200 mel codes, 2 conditioning clips of 1 s (87 mel frames). Each
setting runs in its own process, so the peak RSS (ru_maxrss) is that setting's alone.
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


def one(size: str, checkpointing: bool, steps: int) -> dict:
    """Time ``steps`` training steps after one warm-up step (which allocates AdamW's state)."""
    torch.manual_seed(0)
    model = UnifiedVoice2(**SIZES[size], max_conditioning_inputs=2, checkpointing=checkpointing)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cond = torch.randn(1, 2, 80, 87)
    text = torch.randint(1, 255, (1, 100))
    codes = torch.randint(0, 8192, (1, 200))
    args = (cond, text, torch.tensor([100]), codes, torch.tensor([200 * 1024]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss_text, loss_mel, _ = model(*args)
        (0.01 * loss_text + loss_mel).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "checkpointing": checkpointing,
        "step_s": min(times[1:]),
        "first_step_s": times[0],
        "rss_after_build_gib": rss0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.size, args.one == "on", args.steps)))
        return 0
    rows = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads), "--one", setting]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"unified_voice2 --size {args.size}: {rows[0]['params']:,} parameters, batch 1 "
        f"(text 100, mel 200, 2 clips x 87 frames), {torch.get_num_threads()} threads, fp32 CPU"
    )
    print("checkpointing  step (s)  first step (s)  RSS after build (GiB)  peak RSS (GiB)")
    for r in rows:
        print(
            f"{'on' if r['checkpointing'] else 'off':<13}  {r['step_s']:8.2f}  "
            f"{r['first_step_s']:14.2f}  {r['rss_after_build_gib']:21.2f}  "
            f"{r['peak_rss_gib']:14.2f}"
        )
    print(f"time ratio on/off: {rows[1]['step_s'] / rows[0]['step_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
