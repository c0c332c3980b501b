"""Export a trained network to a plain PyTorch state dict (``.pth``), e.g. for Tortoise.

    cd codebase && python -m models.export \\
        --model ../experiments/gpt/models/5000_gpt_ema.safetensors --out autoregressive.pth

The file is ``torch.save`` of ``{key: tensor}`` with the network's own key names, which for
``unified_voice2`` are Tortoise's: tortoise-tts (``UnifiedVoice``), DLAS and ai-voice-cloning load
it as they load ``autoregressive.pth``. ``--legacy-gpt2-buffers`` adds the causal-mask buffers
that code using transformers < 4.31 expects under a strict load. ``--debug`` prints the
traceback of any error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import models.audio.tts  # noqa: F401 - registers unified_voice2 and valle
from models import load_network
from utils.errors import UserError, run_command
from utils.io import save_torch
from utils.options import add_debug_flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.export",
        description="Write a network saved by the trainer as a plain .pth state dict.",
    )
    p.add_argument(
        "--model", required=True, type=Path, help="<run>/models/<step>_<net>.safetensors"
    )
    p.add_argument("--out", required=True, type=Path, help="the .pth file to write")
    p.add_argument(
        "--legacy-gpt2-buffers",
        action="store_true",
        help="unified_voice2 only: add gpt.h.N.attn.bias/masked_bias as transformers < 4.31 saved",
    )
    add_debug_flag(p)
    return p.parse_args(argv)


def export_state_dict(
    model_path: Path, legacy_gpt2_buffers: bool = False
) -> dict[str, torch.Tensor]:
    """The network's tensors (contiguous, CPU, each with its own storage) by key."""
    net = load_network(model_path)
    if legacy_gpt2_buffers:
        if not hasattr(net, "legacy_state_dict"):
            raise UserError(
                f"{model_path} holds a {type(net).__name__}, which has no legacy GPT-2 buffers; "
                f"drop --legacy-gpt2-buffers"
            )
        state = net.legacy_state_dict()
    else:
        state = net.state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.suffix not in (".pth", ".pt"):
        raise UserError(f"--out {args.out}: name it *.pth (a torch state dict is written)")
    state = export_state_dict(args.model, args.legacy_gpt2_buffers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_torch(state, args.out, verify=True)
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"wrote {args.out}: {len(state)} tensors, {n:,} float values")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
