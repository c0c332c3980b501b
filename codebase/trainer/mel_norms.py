"""Compute a ``mel_norm_file`` for ``torch_mel_spectrogram`` from an experiment's dataset.

A mel-norm file is what DLAS's ``clips_mel_norms.pth`` / Tortoise's ``mel_norms.pth`` is: a
float32 tensor [n_mels] saved with ``torch.save``, the per-channel mean of the (natural,
1e-5-floored) log-mel over every frame of the clips. The injector divides the log-mel by it.

    python -m trainer.mel_norms -opt exp.yml [--phase train] [--items 500] --out norms.pth

(from ``codebase/``). The mel settings are DLAS's defaults (``--n-mels``, ``--sample-rate`` to
change them: use the same as the experiment's ``torch_mel_spectrogram``); the dataset's items
are read one by one (no padding) from ``datasets.<phase>``, spread evenly over it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import trainer.components  # noqa: F401 - registers the datasets
from data.spec import build_dataset, require_phase, validate_datasets
from trainer.injectors.audio import TorchMelSpectrogramInjector
from utils.audio import log_mel
from utils.errors import DataError, run_command
from utils.io import save_torch
from utils.options import experiment_parser, load_cli


def mel_norms(
    dataset: Any, mel: TorchMelSpectrogramInjector, items: int, key: str = "wav"
) -> tuple[torch.Tensor, int]:
    """(per-channel mean log-mel [n_mels], frames averaged) over ``items`` items of
    ``dataset`` (all when it has fewer), spread evenly over it."""
    n = min(items, len(dataset))
    picks = sorted({round(k * (len(dataset) - 1) / max(n - 1, 1)) for k in range(n)})
    total, frames = None, 0
    for index in picks:
        item = dataset[index]
        if key not in item:
            raise DataError(
                f"dataset items have no {key!r} (keys: {sorted(item)}); choose the audio with --key"
            )
        wav = torch.as_tensor(item[key]).float().reshape(1, -1)  # [1, T]
        with torch.no_grad():
            log = log_mel(mel.mel(wav))[0]  # [n_mels, frames]
        total = log.sum(1) if total is None else total + log.sum(1)
        frames += log.shape[1]
    if total is None:
        raise DataError("the dataset has no items to compute mel norms from")
    return (total / frames).float(), frames


def main(argv: list[str] | None = None) -> int:
    p = experiment_parser(__doc__.splitlines()[0])
    p.add_argument("--phase", default="train", help="which datasets.<phase> to read")
    p.add_argument("--items", type=int, default=500, help="items to average over (spread evenly)")
    p.add_argument("--key", default="wav", help="the audio key of the dataset's items")
    p.add_argument("--sample-rate", type=int, default=None, help="default: the dataset's")
    p.add_argument("--n-mels", type=int, default=80, help="mel channels (DLAS: 80)")
    p.add_argument("--out", type=Path, required=True, help="the .pth file to write")
    args = p.parse_args(argv)
    if args.items < 1:
        p.error("--items must be >= 1")

    def dataset_of(opt: dict) -> Any:
        spec = require_phase(validate_datasets(opt), args.phase, opt.get("_file"))
        return build_dataset(spec, args.phase)

    dataset = load_cli(args, dataset_of)
    rate = args.sample_rate or getattr(dataset, "sample_rate", None) or 22050
    mel = TorchMelSpectrogramInjector(sample_rate=rate, n_mels=args.n_mels)
    norms, frames = mel_norms(dataset, mel, args.items, args.key)
    save_torch(norms, args.out)
    print(
        f"wrote {args.out}: mean log-mel of {min(args.items, len(dataset))} items ({frames} "
        f"frames, {rate} Hz, {args.n_mels} mels); range {norms.min():.3f} .. {norms.max():.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
