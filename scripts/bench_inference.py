#!/usr/bin/env python
"""VALL-E inference speed: AR decoding with and without the KV cache, and synthesis RTF.

    python scripts/bench_inference.py [--size small|reference] [--device auto] [--seconds 10]
                                      [--frame-rate 75] [--batch 1]

The AR decodes a target of exactly ``seconds`` x ``frame_rate`` frames (the stop token is
masked so random weights do not stop early) after 40 phonemes and a 3 s prompt, once with the
KV cache and once recomputing the whole sequence each step; both give the same tokens
(checked). Then the real-time factor of full synthesis (AR + NAR + codec decoding with EnCodec
24 kHz, random weights: the same compute as the pretrained model) is measured.
On a GPU the model runs under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "codebase"))

import torch

import trainer.components  # noqa: E402,F401 - registers the models
from models import build_network
from models.audio.codecs import build_codec
from models.audio.tts.valle import REFERENCE_CONFIG
from utils.distributed import DistInfo, resolve_device

SIZES = {
    "small": dict(
        d_model=256, n_layers=4, n_heads=4, n_levels=8, codebook_size=1024, n_phonemes=128
    ),
    "reference": REFERENCE_CONFIG,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--seconds", type=float, default=10.0, help="target length")
    p.add_argument("--frame-rate", type=float, default=75.0, help="codec frames per second")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--skip-uncached", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, DistInfo(0, 0, 1))
    cfg = dict(SIZES[args.size], dropout=0.0)
    model = build_network("valle", cfg).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    stop = cfg["codebook_size"]
    # mask the stop token: random weights would otherwise stop after a few frames
    model.ar_head.register_forward_hook(
        lambda m, i, out: out.index_fill(-1, torch.tensor([stop], device=out.device), float("-inf"))
    )
    frames = int(args.seconds * args.frame_rate)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    prompt_frames = int(3 * args.frame_rate)
    inputs = dict(
        phonemes=torch.randint(3, cfg["n_phonemes"], (b, 40), generator=g).to(device),
        phoneme_lengths=torch.full((b,), 40, device=device),
        prompt=torch.randint(0, stop, (b, cfg["n_levels"], prompt_frames), generator=g).to(device),
        prompt_lengths=torch.full((b,), prompt_frames, device=device),
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def ar(use_cache: bool) -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        with autocast:
            codes, _ = model._generate_ar(
                *inputs.values(), frames, 0.0, 0, 1.0, 1.0, use_cache, None
            )
        sync(device)
        return time.perf_counter() - start, codes

    ar(True)  # warm-up
    t_cached, codes_cached = ar(True)
    print(
        f"valle {args.size}: {n_params / 1e6:.1f}M parameters on {device}"
        f"{' (bf16)' if device.type == 'cuda' else ' (fp32)'}; target {args.seconds:g} s = "
        f"{frames} frames at {args.frame_rate:g} frames/s, batch {b}, "
        f"prefix 40 phonemes + {prompt_frames} prompt frames"
    )
    print(f"  AR with KV cache     {t_cached:7.2f} s  {b * frames / t_cached:9.1f} tokens/s")
    if not args.skip_uncached:
        t_full, codes_full = ar(False)
        same = torch.equal(codes_cached, codes_full)
        print(
            f"  AR without cache     {t_full:7.2f} s  {b * frames / t_full:9.1f} tokens/s  "
            f"(speed-up {t_full / t_cached:.1f}x; same greedy tokens: {same})"
        )

    codec = build_codec("encodec", pretrained=False, bandwidth=6.0).to(device)
    sync(device)
    start = time.perf_counter()
    with autocast:
        codes, lengths = model.generate(
            *inputs.values(), max_frames=frames, temperature=1.0, top_k=50
        )
    sync(device)
    t_model = time.perf_counter() - start
    wav = codec.decode(codes[:, : codec.n_levels].float().long())
    sync(device)
    total = time.perf_counter() - start
    audio = b * wav.shape[-1] / codec.sample_rate
    print(
        f"  synthesis AR+NAR     {t_model:7.2f} s; + EnCodec decode {total - t_model:.2f} s; "
        f"{audio:.1f} s of audio -> real-time factor {total / audio:.3f} "
        f"({audio / total:.1f}x faster than real time)"
    )


if __name__ == "__main__":
    main()
