#!/usr/bin/env python
"""What verified checkpoints cost: saving and loading a network with and without checksums.

    python scripts/bench_checksums.py [--params 50e6] [--repeats 5]

Baselines are safetensors' own ``save_file`` / ``load_file`` (+ ``load_state_dict``) on the
same tensors, in the same run; the checked paths are ``utils.io.save_module`` (content SHA-256
in the metadata, atomic write with fsync) and ``load_module`` (checksum verified), plus the
whole-file SHA-256 that a checkpoint's state records and ``resume_state`` verifies. Prints
medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codebase"))

from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from utils.io import file_sha256, load_module, save_module  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=50e6, help="parameters in the network")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    width = 1024
    layers = max(1, int(args.params // (width * width)))
    net = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        plain, checked = Path(tmp) / "plain.safetensors", Path(tmp) / "checked.safetensors"
        rows = [
            ("save", lambda: save_file(tensors, str(plain)), lambda: save_module(net, checked)),
            (
                "load",
                lambda: net.load_state_dict(load_file(str(plain))),
                lambda: load_module(net, checked),
            ),
        ]
        print(f"{layers} x Linear({width}, {width}): {mb:.0f} MB fp32, median of {args.repeats}")
        print(f"{'':8}{'baseline s':>12}{'checked s':>12}{'ratio':>8}")
        for name, base, ours in rows:
            a, b = median_seconds(base, args.repeats), median_seconds(ours, args.repeats)
            print(f"{name:8}{a:12.3f}{b:12.3f}{b / a:8.2f}")
        h = median_seconds(lambda: file_sha256(checked), args.repeats)
        print(f"file sha256 (resume verification): {h:.3f} s, {mb / h:.0f} MB/s")


if __name__ == "__main__":
    main()
