"""Text + reference clips -> speech with a Tortoise GPT (``unified_voice2``) trained here.

A GPT network file written by the trainer carries what inference needs in its metadata: the BPE
tokenizer of its data (``text_tokenizer``), the mel features it was conditioned on and whose
codes it predicts (``mel_spectrogram``) and the DVAE that made those codes (``dvae``: model,
kwargs and the weights' path). The codes are decoded by that DVAE and the mel is turned into
audio by Griffin-Lim: Tortoise's real decoder (its diffusion model and vocoder) is not part of
this project, so the audio is rough. An exported ``.pth`` (``python -m models.export``) goes to
Tortoise's own inference for that::

    synth = Synthesizer.from_checkpoint("gpt/models/600_gpt_ema.safetensors")
    voice = synth.encode_prompt(["ref1.wav", "ref2.wav"], seconds=2.0)   # [clips, 80, frames]
    wavs = synth.synthesize(["Hello there."], voice, temperature=0.8, top_p=0.8, seed=0)

(``Synthesizer.from_checkpoint`` returns one of these for a ``unified_voice2`` file, so
``synthesize.py`` speaks with both model families.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import models.audio.tts  # noqa: F401 - registers unified_voice2 and lucidrains_dvae
from data.audio.bpe_tokenizer import UNK_ID, BpeTokenizer, VocabError
from data.loader import pad_batch
from models import build_network
from models.audio.tts.synthesis_common import (
    MAX_DURATION_CAP,
    EmptyPrompt,
    NotASynthesisCheckpoint,
    SynthesisError,
    sampling_problems,
)
from utils.audio import DlasMel, load_audio
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.io import load_module
from utils.registry import did_you_mean

REQUIRED_METADATA = ("text_tokenizer", "mel_spectrogram", "dvae")
# Options of the decoding side that a user may override (--codec-option KEY=VALUE).
DECODER_OPTIONS = ("dvae_weights", "griffin_lim_iters")


class TortoiseSynthesizer:
    """A trained ``unified_voice2`` with the tokenizer, mel features and DVAE it was trained
    with.

    Args:
        model: the GPT.
        tokenizer: its BPE tokenizer.
        mel: the mel features (conditioning input, DVAE input, and their inverse).
        dvae: the DVAE whose codes the GPT predicts.
        device: where the GPT and DVAE run.
        griffin_lim_iters: Griffin-Lim iterations when decoding.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: BpeTokenizer,
        mel: DlasMel,
        dvae: nn.Module,
        device: str | torch.device = "cpu",
        griffin_lim_iters: int = 32,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.mel = mel.to(self.device)
        self.dvae = dvae.to(self.device).eval()
        self.griffin_lim_iters = int(griffin_lim_iters)

    @classmethod
    def from_metadata(
        cls,
        path: Path,
        meta: dict[str, Any],
        device: str | torch.device = "cpu",
        options: dict[str, Any] | None = None,
        model: nn.Module | None = None,
    ) -> TortoiseSynthesizer:
        """Build from a network file's metadata (read by ``Synthesizer.from_checkpoint``);
        ``options`` override ``dvae_weights`` (a moved DVAE) or ``griffin_lim_iters``.
        ``model``: the GPT already loaded (with LoRA adapters merged); else it is ``path``'s."""

        options = dict(options or {})
        unknown = [k for k in options if k not in DECODER_OPTIONS]
        if unknown:
            raise SynthesisError(
                f"unknown decoder option {unknown[0]!r}{did_you_mean(unknown[0], DECODER_OPTIONS)}"
                f" for a unified_voice2 checkpoint; the options are {list(DECODER_OPTIONS)}"
            )
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise NotASynthesisCheckpoint(
                f"{path} has no {', '.join(repr(k) for k in missing)} metadata, so its text "
                f"tokenizer, mel features or DVAE are unknown. The trainer saves them for an "
                f"experiment like experiments/tortoise_demo/gpt.yml (paired_voice_audio with "
                f"use_bpe_tokenizer, torch_mel_spectrogram and discrete_token injectors); a "
                f"Tortoise autoregressive.pth goes to Tortoise's own inference"
            )
        try:
            tokenizer = BpeTokenizer.from_config(json.loads(meta["text_tokenizer"]))
            mel = DlasMel.from_config(json.loads(meta["mel_spectrogram"]))
            dvae_meta = json.loads(meta["dvae"])
        except (ValueError, TypeError, KeyError, VocabError) as e:
            raise NotASynthesisCheckpoint(
                f"{path}: unreadable synthesis metadata ({e}); re-save the checkpoint with "
                f"this trainer"
            ) from e
        weights = Path(options.get("dvae_weights") or dvae_meta["weights"])
        if not weights.is_file():
            raise NotASynthesisCheckpoint(
                f"the DVAE weights {weights} that {path} was trained with do not exist (moved or "
                f"deleted?); point at them with --codec-option dvae_weights=/new/place/file"
            )
        dvae = build_network(dvae_meta["which_model"], dvae_meta["kwargs"])
        to_load = [(dvae, weights)]
        if model is None:
            model = build_network(meta["which_model"], meta["kwargs"])
            to_load.append((model, path))
        for net, file in to_load:
            try:
                load_module(net, file, strict=True)
            except (ValueError, UserError) as e:
                raise NotASynthesisCheckpoint(str(e)) from e
        iters = int(options.get("griffin_lim_iters", 32))
        return cls(model, tokenizer, mel, dvae, device, griffin_lim_iters=iters)

    # ------------------------------------------------------------------------- properties

    @property
    def sample_rate(self) -> int:
        """Hz of the audio :meth:`synthesize` returns (the mel features')."""
        return self.mel.sample_rate

    @property
    def frame_rate(self) -> float:
        """Codes per second (audio samples per code: ``mel_length_compression``)."""
        return self.sample_rate / self.model.mel_length_compression

    def prompt_seconds(self, prompt: torch.Tensor) -> float:
        """Seconds of voice in an encoded prompt (per clip, the longest)."""
        return (prompt.shape[-1] - 1) * self.mel.mel.hop_length / self.sample_rate

    # ------------------------------------------------------------------------- inputs

    @torch.no_grad()
    def encode_prompt(
        self,
        audio: str | Path | torch.Tensor | Sequence[str | Path | torch.Tensor],
        seconds: float | None = 3.0,
        sample_rate: int | None = None,
    ) -> torch.Tensor:
        """The voice: conditioning mels [clips, n_mels, frames] of one or more reference clips
        (files, or waveforms [T] at ``sample_rate``), each its first ``seconds`` (None: all),
        zero-padded to the longest."""

        clips = [audio] if isinstance(audio, (str, Path, torch.Tensor)) else list(audio)
        if not clips:
            raise SynthesisError("encode_prompt: give at least one reference clip")
        if seconds is not None and seconds <= 0:
            raise SynthesisError(f"encode_prompt: seconds must be > 0 (or None), got {seconds}")
        wavs = []
        for clip in clips:
            if isinstance(clip, (str, Path)):
                wav, _ = load_audio(clip, self.sample_rate)
            else:
                wav = clip.detach().float().cpu().reshape(-1)
                rate = sample_rate or self.sample_rate
                if rate != self.sample_rate:
                    import torchaudio.functional as AF

                    wav = AF.resample(wav, rate, self.sample_rate)
            if seconds is not None:
                wav = wav[: int(round(seconds * self.sample_rate))]
            if wav.numel() == 0:
                where = f" {clip}" if isinstance(clip, (str, Path)) else ""
                raise EmptyPrompt(
                    f"the prompt audio{where} is empty; give a recording of the voice"
                )
            wavs.append(wav)
        padded, _ = pad_batch(wavs)  # [clips, T]
        return self.mel(padded.to(self.device)).cpu()  # [clips, n_mels, frames]

    def text_tokens(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """BPE ids of each text (cleaned as in training)."""

        out = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text)
            if not ids:
                raise SynthesisError(f"text {i} ({text!r}) is empty after cleaning")
            out.append(torch.tensor(ids, dtype=torch.long))
        return out

    def text_warnings(self, texts: Sequence[str]) -> list[str]:
        """Characters of each text the vocabulary lacks (they become [UNK])."""
        out = []
        vocab = self.tokenizer.tokenizer.get_vocab()
        for text in texts:
            cleaned = self.tokenizer.clean(text)
            if UNK_ID in self.tokenizer.encode_cleaned(cleaned):
                missing = sorted({ch for ch in cleaned if ch != " " and ch not in vocab})
                out.append(
                    f"{''.join(missing) or '?'!r} in {text!r} is not in the model's text "
                    f"vocabulary and becomes [UNK]; the training data never had it"
                )
        return out

    def max_frames(self, max_duration: float) -> int:
        """Codes in ``max_duration`` seconds (at least 1), at most the model's position table."""

        if not 0 < max_duration <= MAX_DURATION_CAP:
            raise SynthesisError(
                f"max_duration must be in (0, {MAX_DURATION_CAP:g}] seconds, got {max_duration}"
            )
        wanted = max(1, math.floor(max_duration * self.frame_rate))
        return min(wanted, int(self.model.max_mel_tokens))

    # ------------------------------------------------------------------------- synthesis

    @torch.no_grad()
    def synthesize(self, texts: Sequence[str], prompt: torch.Tensor, **options: Any):
        """Speak each text in the voice of ``prompt`` (:meth:`encode_prompt`): one waveform
        [T] per text. ``options`` are those of :meth:`generate`."""
        return self.decode(self.generate(texts, prompt, **options))

    @torch.no_grad()
    def generate(
        self,
        texts: Sequence[str],
        prompt: torch.Tensor,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.8,
        repetition_penalty: float = 1.0,
        max_duration: float = 20.0,
        seed: int | None = None,
        nar_temperature: float = 0.0,
    ) -> list[torch.Tensor]:
        """DVAE codes [n_i] (CPU) of each text, generated as one batch (KV cache; each item
        stops at its own stop token). ``repetition_penalty`` and ``nar_temperature`` are
        VALL-E's and must keep their defaults."""

        if isinstance(texts, str):
            raise TypeError("synthesize takes a list of texts; wrap one text in a list")
        if not texts:
            return []
        problems = sampling_problems(
            temperature=temperature, top_k=top_k, top_p=top_p, max_duration=max_duration
        )
        if repetition_penalty != 1.0 or nar_temperature != 0.0:
            problems.append(
                ("repetition_penalty/nar_temperature", "are VALL-E options; a GPT has neither")
            )
        if problems:
            raise SynthesisError("; ".join(f"{name} {msg}" for name, msg in problems))
        if prompt.dim() != 3 or prompt.shape[1] != self.mel.mel.n_mels:
            raise SynthesisError(
                f"the prompt must be conditioning mels [clips, {self.mel.mel.n_mels}, frames] "
                f"(encode_prompt), got shape {tuple(prompt.shape)}"
            )
        text, lengths = pad_batch(self.text_tokens(texts))
        b = text.shape[0]
        cond = prompt[None].expand(b, -1, -1, -1).to(self.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        codes, _ = self.model.generate(
            cond,
            text.to(self.device),
            max_mel_tokens=self.max_frames(max_duration),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            kv_cache=True,
            generator=generator,
            text_lengths=lengths.to(self.device),
        )
        return [codes_before_stop(row, self.dvae.num_tokens) for row in codes.cpu()]

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """DVAE codes [n_i] per item -> waveform [T_i] per item (DVAE, then Griffin-Lim)."""
        return [decode_dvae_codes(self.dvae, self.mel, c, self.griffin_lim_iters) for c in codes]


def codes_before_stop(row: torch.Tensor, n_codes: int) -> torch.Tensor:
    """A generated row's DVAE codes up to its first special token (the stop, or any id
    ``>= n_codes``): what the DVAE can decode."""
    special = (row >= n_codes).nonzero()
    return row[: int(special[0]) if len(special) else row.numel()]


@torch.no_grad()
def decode_dvae_codes(
    dvae: nn.Module, mel: DlasMel, codes: torch.Tensor, griffin_lim_iters: int = 32
) -> torch.Tensor:
    """DVAE codes [n] -> audio [T] on the CPU: the DVAE's decoder, then the inverse of the mel
    features it was trained on (Griffin-Lim). Shared with the ``tortoise_samples`` evaluator."""
    if codes.numel() == 0:
        return torch.zeros(0)
    device = next(dvae.parameters()).device
    decoded, _ = dvae.decode(codes.reshape(1, -1).to(device))
    return mel.to_audio(decoded, griffin_lim_iters)[0].cpu()
