"""Our unified_voice2 against the outputs of the original Tortoise and DLAS code.

Fixtures: ``shared/golden/tortoise`` beside the repository (or ``$TORTOISE_GOLDEN``), see its
README. Shared by
tests/test_unified_voice2.py (asserts every difference is within tolerance) and
scripts/golden_tortoise.py (prints the table).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.audio.tts.unified_voice2 import UnifiedVoice2
from utils.io import load_module

SHARED_GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "tortoise"
GOLDEN = Path(os.environ.get("TORTOISE_GOLDEN", SHARED_GOLDEN))
TOLERANCE = 1e-5


@dataclass
class Row:
    name: str
    max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def tiny_kwargs() -> dict:
    """The DLAS kwargs the tiny fixtures were made with."""
    return dict(
        json.loads((GOLDEN / "unified_voice_tiny.json").read_text())["dlas_unified_voice2_kwargs"]
    )


def tiny_model(**overrides) -> UnifiedVoice2:
    """The tiny model with the fixture weights, loaded strictly from the .pth (legacy buffers
    included, so ``adapt_checkpoint`` is exercised), in eval mode."""
    model = UnifiedVoice2(**{**tiny_kwargs(), **overrides})
    load_module(model, GOLDEN / "unified_voice_tiny.pth", strict=True)
    return model.eval()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {list(a.shape)} vs expected {list(b.shape)}")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare_tortoise() -> list[Row]:
    """Tortoise's UnifiedVoice (tortoise_compat=True): latents, forward, greedy AR steps."""
    io = load_file(str(GOLDEN / "unified_voice_tiny_io.safetensors"))
    model = tiny_model(tortoise_compat=True)
    rows: list[Row] = []
    with torch.no_grad():
        mel_codes = io["mel_codes"].clone()
        rows.append(
            Row(
                "per_clip_latents",
                _diff(model._encode_clips(io["cond_mels"]), io["per_clip_latents"]),
            )
        )
        latent = model.get_conditioning(io["cond_mels"])
        rows.append(Row("conditioning_latent", _diff(latent, io["conditioning_latent"])))
        args = (io["text_inputs"], io["text_lengths"], mel_codes, io["wav_lengths"])
        loss_text, loss_mel, mel_logits = model(latent, *args)
        rows += [
            Row("loss_text", _diff(loss_text, io["loss_text"])),
            Row("loss_mel", _diff(loss_mel, io["loss_mel"])),
            Row("mel_logits", _diff(mel_logits, io["mel_logits"])),
            Row("mel_codes unchanged", _diff(mel_codes, io["mel_codes"])),
        ]
        text_in, text_tgt, mel_in, mel_tgt = model.training_sequences(*args)
        text_logits, _ = model.logits(latent[:, None], text_in, mel_in)
        rows += [
            Row("text_logits", _diff(text_logits, io["text_logits"])),
            Row("text_inputs_aligned", _diff(text_in, io["text_inputs_aligned"])),
            Row("text_targets", _diff(text_tgt, io["text_targets"])),
            Row("mel_inputs_aligned", _diff(mel_in, io["mel_inputs_aligned"])),
            Row("mel_targets", _diff(mel_tgt, io["mel_targets"])),
        ]
        for b in range(2):
            for cache in (False, True):
                tokens, logits = model.generate(
                    io[f"ar_b{b}_latent"][None], io[f"ar_b{b}_text"][None], 3, kv_cache=cache
                )
                tag = f"ar_nokv_b{b} (ours, kv_cache={cache})"
                rows.append(Row(f"{tag} tokens", _diff(tokens[0], io[f"ar_nokv_b{b}_tokens"])))
                rows.append(Row(f"{tag} logits", _diff(logits[0], io[f"ar_nokv_b{b}_logits"])))
    return rows


def compare_dlas() -> list[Row]:
    """DLAS unified_voice2 (tortoise_compat=False): per-clip conds, forward with N tokens and
    with averaged conditioning."""
    io = load_file(str(GOLDEN / "unified_voice2_dlas_tiny_io.safetensors"))
    args = (io["text_inputs"], io["text_lengths"], io["mel_codes"], io["wav_lengths"])
    rows: list[Row] = []
    with torch.no_grad():
        model = tiny_model(tortoise_compat=False)
        rows.append(Row("dlas conds", _diff(model._encode_clips(io["cond_mels"]), io["conds"])))
        loss_text, loss_mel, logits = model(io["cond_mels"], *args)
        text_in, _, mel_in, _ = model.training_sequences(*args)
        text_logits, _ = model.logits(model.conditioning_tokens(io["cond_mels"]), text_in, mel_in)
        rows += [
            Row("dlas loss_text", _diff(loss_text, io["loss_text"])),
            Row("dlas loss_mel", _diff(loss_mel, io["loss_mel"])),
            Row("dlas logits", _diff(logits, io["logits"])),
            Row("dlas text_logits", _diff(text_logits, io["text_logits"])),
        ]
        avg = tiny_model(tortoise_compat=False, average_conditioning_embeddings=True)
        loss_text, loss_mel, _ = avg(io["cond_mels"], *args)
        rows += [
            Row("dlas avg_cond loss_text", _diff(loss_text, io["avg_cond_loss_text"])),
            Row("dlas avg_cond loss_mel", _diff(loss_mel, io["avg_cond_loss_mel"])),
        ]
    return rows


def compare_all() -> list[Row]:
    return compare_tortoise() + compare_dlas()


def table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'comparison':<{width}}  max |diff|  within {TOLERANCE:g}"]
    lines += [f"{r.name:<{width}}  {r.max_abs_diff:10.3g}  {'yes' if r.ok else 'NO'}" for r in rows]
    return "\n".join(lines)
