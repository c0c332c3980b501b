#!/usr/bin/env python
"""Data pipeline throughput: the data.h5 loader against wav loading + on-the-fly encoding.

    python scripts/bench_data.py [--items 300] [--seconds 3.0] [--batch-size 16]

Builds a synthetic multi-speaker corpus (harmonic tones with moving pitch; audio content does
not change loading or encoding cost), prepares it into data.h5 with ``mel_rvq`` and with
``encodec`` (random weights: the same compute as the pretrained model), then measures:

- preparation throughput (seconds of audio per second of wall time) for each codec;
- items/s of the ``hdf5_codes`` loader with 0 and 2 workers;
- items/s of ``paired_voice_audio`` (wav files) + ``mel_rvq`` encoding in the loop, the
  on-the-fly alternative, and the ratio between the two.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "codebase"))

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader

import trainer.components  # noqa: E402,F401 - registers datasets and codecs
from data.audio.corpus_to_h5 import PrepareOptions, codec_options_for, prepare
from data.audio.hdf5_dataset import Hdf5CodesDataset
from data.audio.paired_dataset import PairedVoiceAudioDataset
from models.audio.codecs import build_codec

WORDS = (  # noqa: SIM905 - a sentence reads better than 23 quoted words
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet "
    "hills and rivers run toward the sea"
).split()


def make_corpus(root: Path, items: int, seconds: float, sample_rate: int = 16000) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(items):
        speaker = f"spk{i % 8}"
        dur = seconds * rng.uniform(0.6, 1.4)
        t = np.arange(int(sample_rate * dur)) / sample_rate
        f0 = 100 + 15 * (i % 8) + 20 * np.sin(2 * math.pi * rng.uniform(0.5, 2) * t)
        phase = 2 * math.pi * np.cumsum(f0) / sample_rate
        wav = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(3 * t))
        wav += 0.01 * rng.standard_normal(len(t))
        sf.write(root / f"utt{i:05d}.wav", (0.2 * wav).astype(np.float32), sample_rate)
        text = " ".join(rng.choice(WORDS, size=rng.integers(4, 11)))
        lines.append(f"utt{i:05d}.wav\t{text}\t{speaker}")
    (root / "index.tsv").write_text("\n".join(lines) + "\n")
    return root / "index.tsv"


def items_per_second(loader: DataLoader, epochs: int = 2) -> float:
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["id"] if "id" in batch else batch["path"])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--seconds", type=float, default=3.0, help="mean utterance length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        tsv = make_corpus(tmp, args.items, args.seconds)
        rows = []
        mel_opts = PrepareOptions(
            fetcher_mode="tsv",
            path=tsv,
            codec="mel_rvq",
            codec_options={"hop_length": 400},
            fit_minutes=5,
        )
        report = prepare(tmp / "mel.h5", mel_opts, progress=False)
        rows.append(("prepare mel_rvq (incl. fitting)", report))
        enc_opts = PrepareOptions(
            fetcher_mode="tsv",
            path=tsv,
            codec="encodec",
            codec_options={"pretrained": False, "bandwidth": 6.0},
        )
        rows.append(
            ("prepare encodec 24 kHz, 8 levels", prepare(tmp / "enc.h5", enc_opts, progress=False))
        )
        print(
            f"corpus: {args.items} utterances, {rows[0][1].audio_seconds / 60:.1f} min of "
            f"audio, 16 kHz, {args.threads} threads"
        )
        for name, r in rows:
            print(f"  {name:34s} {r.wall_seconds:7.1f} s  {r.realtime_factor:8.1f} s of audio/s")

        ds = Hdf5CodesDataset(tmp / "mel.h5", prompt_frames=120)
        h5_rates = {}
        for workers in (0, 2):
            loader = DataLoader(
                ds,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=ds.collate,
                persistent_workers=workers > 0,
            )
            items_per_second(loader, epochs=1)  # warm up (file handles, worker start)
            h5_rates[workers] = items_per_second(loader)

        codec = build_codec("mel_rvq", **codec_options_for(mel_opts, tmp / "mel.h5")).eval()
        raw = PairedVoiceAudioDataset(path=tsv, fetcher_mode="tsv", sample_rate=16000)

        def on_the_fly(workers: int) -> float:
            loader = DataLoader(
                raw,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=raw.collate,
            )
            n, start = 0, time.perf_counter()
            for batch in loader:
                for wav, length in zip(batch["wav"], batch["wav_lengths"]):
                    codec.encode(wav[:length])  # what audio_to_codes does per item
                n += len(batch["path"])
            return n / (time.perf_counter() - start)

        fly = on_the_fly(0)
        print(f"  {'hdf5_codes loader, 0 workers':34s} {h5_rates[0]:9.0f} items/s")
        print(f"  {'hdf5_codes loader, 2 workers':34s} {h5_rates[2]:9.0f} items/s")
        print(f"  {'wav + on-the-fly mel_rvq, 0 workers':34s} {fly:9.0f} items/s")
        print(f"  ratio data.h5 (0 workers) / on-the-fly: {h5_rates[0] / fly:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
