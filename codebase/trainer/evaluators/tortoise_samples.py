"""``tortoise_samples``: score Tortoise's GPT (``unified_voice2``) on held-out sentences while it
trains, and let a listener hear it.

YAML (the GPT recipe's ``eval`` section)::

    eval:
      every: 500
      at_start: true
      evaluators:
        samples: {type: tortoise_samples, dataset: val, num_samples: 16}

The GPT's inputs are made by the experiment's own injectors (the step that trains it, run in
eval mode up to its ``generator`` injector: mels, conditioning mels and DVAE codes exactly as in
training; see :mod:`trainer.evaluators.step_inputs`). Codes become audio through the same DVAE
(``discrete_token``'s) and the inverse of the ``torch_mel_spectrogram`` that fed it
(Griffin-Lim): Tortoise's own decoder (diffusion + vocoder) is not part of this project, so the
audio is rough but the words are there. References are the items' true codes decoded the same
way, so outputs and references differ only by the codes.

Scalars (logged as ``eval/<name>``):

- teacher-forced over the first ``teacher_forced_items``: ``tf_loss_text``, ``tf_loss_mel``
  (cross-entropy over each item's real positions and its stop token, not DLAS's mean over the
  padding too), ``tf_acc_mel`` (next-code top-1 accuracy) with ``tf_acc_mel_repeat_baseline``
  (predict the previous code) on the same positions, ``tf_acc_mel_changes`` (positions whose
  code differs from the previous one) and ``tf_change_fraction``;
- free-running (KV cache, batched, each item stopping at its own stop token), the figures every
  TTS evaluator here reports: ``duration_ratio``, ``mel_stft``, ``dtw_own``/``dtw_others``,
  ``own_closest`` next to ``own_closest_chance``
  (:class:`trainer.evaluators.speech_samples.SpeechSamplesEvaluator`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.audio.tts.tortoise_synthesis import codes_before_stop, decode_dvae_codes
from trainer.component import TrainerEnv
from trainer.evaluators.speech_metrics import code_prediction_sums
from trainer.evaluators.speech_samples import (
    FREE_RUNNING_ROWS,
    SpeechSamplesEvaluator,
    to_device,
)
from trainer.evaluators.step_inputs import StepInputs
from trainer.injectors.audio import TorchMelSpectrogramInjector
from utils.schema import Runtime

# unified_voice2.forward's arguments, in order
GPT_ARGUMENTS = (
    "speech_conditioning_input",
    "text_inputs",
    "text_lengths",
    "mel_codes",
    "wav_lengths",
)
_SUMS = (
    "text_loss",
    "text_count",
    "mel_loss",
    "mel_count",
    "ar_frames",
    "ar_hits",
    "repeat_hits",
    "changes",
    "change_hits",
)


class TortoiseSamplesEvaluator(SpeechSamplesEvaluator):
    """Teacher-forced and free-running scores of a ``unified_voice2`` (see the module docstring).

    Args:
        network: the GPT (its EMA copy when there is one).
        dataset: the dataset phase whose items are spoken (``paired_voice_audio`` with BPE text
            and conditioning clips of the same speaker).
        step: the step whose injectors make the GPT's inputs (None: the step training it).
        num_samples, teacher_forced_items, reference_items, batch_size, max_duration_factor,
        voice_references, voice_reference_items:
            see :class:`trainer.evaluators.speech_samples.SpeechSamplesEvaluator`.
        temperature: sampling temperature (0: greedy); Tortoise samples at 0.8.
        top_k: top-k sampling (0: off).
        top_p: nucleus sampling (1: off); Tortoise uses 0.8.
        seed: sampling seed, fixed so evaluations differ only by the weights.
        griffin_lim_iters: Griffin-Lim iterations per decoded clip.
    """

    REPORT_ROWS = (
        ("tf_loss_text", "held-out loss, text (teacher-forced)"),
        ("tf_loss_mel", "held-out loss, mel codes"),
        ("tf_acc_mel", "mel-code top-1 accuracy"),
        ("tf_acc_mel_repeat_baseline", "  baseline: repeat previous code"),
        ("tf_acc_mel_changes", "  accuracy where the code changes"),
        *FREE_RUNNING_ROWS,
    )

    def __init__(
        self,
        network: str = "gpt",
        dataset: str = "val",
        step: str | None = None,
        num_samples: int = 8,
        teacher_forced_items: int = 256,
        reference_items: int = 128,
        batch_size: int = 16,
        max_duration_factor: float = 2.0,
        voice_references: list[str] | None = None,
        voice_reference_items: int = 8,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.8,
        seed: int = 0,
        griffin_lim_iters: int = 32,
        networks: Runtime[dict[str, nn.Module]] = None,
        env: Runtime[TrainerEnv] = None,
        datasets: Runtime[dict[str, Any]] = None,
        logger: Runtime[Any] = None,
        steps: Runtime[dict[str, Any]] = None,
    ) -> None:
        super().__init__(
            network,
            dataset,
            num_samples,
            teacher_forced_items,
            reference_items,
            batch_size,
            max_duration_factor,
            voice_references,
            voice_reference_items,
            networks,
            env,
            datasets,
            logger,
        )
        if not hasattr(networks[network], "training_sequences"):
            raise ValueError(
                f"tortoise_samples: network {network!r} ({type(networks[network]).__name__}) "
                f"is not a unified_voice2; use tts_samples for VALL-E"
            )
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or griffin_lim_iters < 1:
            raise ValueError(
                f"tortoise_samples: need temperature >= 0, top_k >= 0, top_p in (0, 1] and "
                f"griffin_lim_iters >= 1, got {temperature}, {top_k}, {top_p}, "
                f"{griffin_lim_iters}"
            )
        self.inputs = StepInputs(steps, network, GPT_ARGUMENTS, step, "tortoise_samples")
        codes_key = self.inputs.keys["mel_codes"]
        tokens = self.inputs.producer(codes_key)
        if tokens is None or not hasattr(tokens, "dvae"):
            raise ValueError(
                f"tortoise_samples: the GPT's codes {codes_key!r} must come from a "
                f"discrete_token injector of step {self.inputs.step_name!r} (its DVAE decodes "
                f"the generated codes)"
            )
        self.dvae = tokens.dvae
        self.mel = self.inputs.producer(tokens.input, TorchMelSpectrogramInjector)
        if self.mel is None:
            raise ValueError(
                f"tortoise_samples: the DVAE's input {tokens.input!r} must come from a "
                f"torch_mel_spectrogram injector of step {self.inputs.step_name!r} (its "
                f"inverse turns decoded mels into audio)"
            )
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed, self.griffin_lim_iters = seed, griffin_lim_iters

    # ------------------------------------------------------------------------- inputs

    def gpt_inputs(self, items: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The GPT's five forward arguments for ``items``, as training makes them."""
        batch = to_device(self.datasets[self.dataset_phase].collate(items), self.env.device)
        state = self.inputs.prepare(batch, self.env.step)
        return [state[self.inputs.keys[a]] for a in GPT_ARGUMENTS]

    def code_ends(self, model: nn.Module, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Codes per item, as training keeps them (one past the true end, DLAS's rule)."""
        return wav_lengths.long() // model.mel_length_compression + 1

    def sample_rate(self) -> int:
        return self.mel.sample_rate

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """DVAE codes [n] -> audio [T], as synthesis decodes them."""
        return decode_dvae_codes(self.dvae, self.mel.transform, codes, self.griffin_lim_iters)

    def decode_reference(self, index: int, phase: str | None = None) -> torch.Tensor:
        model = self.networks[self.network]
        item = self.datasets[phase or self.dataset_phase][index]
        *_, codes, wav_lengths = self.gpt_inputs([item])
        end = min(int(self.code_ends(model, wav_lengths)[0]), codes.shape[1])
        return self.decode(codes[0, :end])

    # ------------------------------------------------------------------------- scores

    def teacher_forced(self, model: nn.Module) -> dict[str, float]:
        sums = dict.fromkeys(_SUMS, 0.0)
        for _, items in self.batches(list(range(self.teacher_forced_items))):
            cond, text, text_lengths, codes, wav_lengths = self.gpt_inputs(items)
            text_in, text_tgt, mel_in, mel_tgt = model.training_sequences(
                text, text_lengths, codes, wav_lengths
            )
            text_logits, mel_logits = model.logits(model.conditioning_tokens(cond), text_in, mel_in)
            # real targets: the text and its stop; the codes training keeps and their stop
            text_valid = _positions(text_tgt) <= text_lengths[:, None]
            ends = self.code_ends(model, wav_lengths)[:, None]
            mel_valid = _positions(mel_tgt) <= ends
            code_valid = (_positions(mel_tgt) < ends) & (mel_tgt != model.stop_mel_token)
            for name, logits, target, valid in (
                ("text", text_logits, text_tgt, text_valid),
                ("mel", mel_logits, mel_tgt, mel_valid),
            ):
                loss = F.cross_entropy(logits.float(), target, reduction="none")
                sums[f"{name}_loss"] += float((loss * valid).sum())
                sums[f"{name}_count"] += float(valid.sum())
            for k, v in code_prediction_sums(mel_logits.argmax(1), mel_tgt, code_valid).items():
                sums[k] += v

        def ratio(a: str, b: str) -> float:
            return sums[a] / sums[b] if sums[b] else float("nan")

        return {
            "tf_loss_text": ratio("text_loss", "text_count"),
            "tf_loss_mel": ratio("mel_loss", "mel_count"),
            "tf_acc_mel": ratio("ar_hits", "ar_frames"),
            "tf_acc_mel_repeat_baseline": ratio("repeat_hits", "ar_frames"),
            "tf_acc_mel_changes": ratio("change_hits", "changes"),
            "tf_change_fraction": ratio("changes", "ar_frames"),
        }

    def speak(
        self, model: nn.Module, indices: list[int], items: list[dict[str, Any]], step: int
    ) -> list[tuple[torch.Tensor, int, int]]:
        cond, text, text_lengths, codes, wav_lengths = self.gpt_inputs(items)
        ref_frames = self.code_ends(model, wav_lengths).clamp(max=codes.shape[1]).tolist()
        limits = [self.frame_limit(r) for r in ref_frames]
        g = torch.Generator(device=self.env.device).manual_seed(self.seed + indices[0])
        generated, _ = model.generate(
            cond,
            text,
            max_mel_tokens=max(limits),
            kv_cache=True,
            generator=g,
            text_lengths=text_lengths,
            **self.sampling,
        )
        out = []
        for row, limit, ref in zip(generated, limits, ref_frames):
            codes = codes_before_stop(row, self.dvae.num_tokens)[:limit]
            out.append((self.decode(codes), codes.numel(), ref))
        return out


def _positions(target: torch.Tensor) -> torch.Tensor:
    return torch.arange(target.shape[1], device=target.device)[None]
