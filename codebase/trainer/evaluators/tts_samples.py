"""``tts_samples``: speak held-out items during training, save, log and score them.

YAML::

    eval:
      every: 1000
      at_start: true          # also before the first step, for a "before" figure
      evaluators:
        samples: {type: tts_samples, dataset: val, num_samples: 16}

Every evaluation generates the same ``num_samples`` items of the dataset (taken in turn from
each speaker; same phonemes, prompt and seed), so audio and curves are comparable across steps.
Per item it writes ``samples/<step>/<id>.wav``, ``<id>_ref.wav`` (the reference codes decoded
by the same codec), ``<id>.png`` and ``<id>_ref.png`` (log-mels), and logs the audio and mel
images under ``samples/<id>``. The scalars it returns (logged as ``eval/<scalar>``):

- teacher-forced, over the dataset's items (see :mod:`trainer.evaluators.speech_metrics`):
  ``tf_loss_ar``, ``tf_loss_nar``, ``tf_acc_ar`` with ``tf_acc_ar_repeat_baseline`` (predict
  the previous code) on the same frames, ``tf_acc_ar_changes`` (frames whose code differs from
  the previous one), ``tf_change_fraction``, ``tf_acc_nar``;
- free-running: ``duration_ratio`` (generated / reference duration; near 1 once the model
  learns to stop), ``mel_stft`` (auraloss' mel STFT distance to the reference, lower is
  better), ``dtw_own`` / ``dtw_others`` (mel distance after DTW to the own reference / to the
  other references of the same voice), ``own_closest`` (fraction of outputs nearest to their
  own reference) next to ``own_closest_chance``.

:meth:`TtsSamplesEvaluator.report` compares the first and the latest evaluation in words; the
trainer prints it at the end of training.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from models.audio.tts.synthesis import (
    build_codec_from_config,
    decode_codes,
    generate_codes,
)
from trainer.component import TrainerEnv
from trainer.evaluators.speech_metrics import (
    TF_SUMS,
    teacher_forced_metrics,
    teacher_forced_sums,
)
from trainer.evaluators.speech_samples import (
    FREE_RUNNING_ROWS,
    SpeechSamplesEvaluator,
    to_device,
)
from utils.schema import Runtime


class TtsSamplesEvaluator(SpeechSamplesEvaluator):
    """Score a VALL-E on a held-out dataset: teacher-forced and free-running.

    Args:
        network: the VALL-E network to sample from (its EMA copy when there is one).
        dataset: the dataset phase whose items are spoken: an ``hdf5_codes`` dataset (items
            with codes, phonemes, prompt, speaker, id; ``codec_config`` from its data file).
        num_samples, teacher_forced_items, reference_items, batch_size, max_duration_factor,
        voice_references, voice_reference_items: see
            :class:`trainer.evaluators.speech_samples.SpeechSamplesEvaluator`.
        temperature: AR sampling temperature.
        top_k: AR top-k sampling (0: off).
        top_p: AR nucleus sampling (1: off).
        repetition_penalty: AR repetition penalty (1: off).
        nar_temperature: NAR sampling temperature (0: greedy).
        seed: sampling seed, fixed so evaluations differ only by the weights.
        codec_options: overrides of the data file's codec config (e.g. a moved ``checkpoint``).
    """

    REPORT_ROWS = (
        ("tf_loss_ar", "held-out loss, AR (teacher-forced)"),
        ("tf_loss_nar", "held-out loss, NAR"),
        ("tf_acc_ar", "AR top-1 accuracy"),
        ("tf_acc_ar_repeat_baseline", "  baseline: repeat previous code"),
        ("tf_acc_ar_changes", "  accuracy where the code changes"),
        ("tf_acc_nar", "NAR top-1 accuracy"),
        *FREE_RUNNING_ROWS,
    )

    def __init__(
        self,
        network: str = "valle",
        dataset: str = "val",
        num_samples: int = 4,
        teacher_forced_items: int = 512,
        reference_items: int = 256,
        batch_size: int = 16,
        max_duration_factor: float = 2.0,
        voice_references: list[str] | None = None,
        voice_reference_items: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        nar_temperature: float = 0.0,
        seed: int = 0,
        codec_options: dict[str, Any] | None = None,
        networks: Runtime[dict[str, nn.Module]] = None,
        env: Runtime[TrainerEnv] = None,
        datasets: Runtime[dict[str, Any]] = None,
        logger: Runtime[Any] = None,
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
        self.codec_config = _codec_config(datasets[dataset], dataset)
        for phase in voice_references or []:
            other = _codec_config(datasets[phase], phase)
            if other != self.codec_config:
                keys = sorted(
                    k
                    for k in set(other) | set(self.codec_config)
                    if other.get(k) != self.codec_config.get(k)
                )
                raise ValueError(
                    f"tts_samples: voice_references dataset {phase!r} was coded with another "
                    f"codec than {dataset!r} (they differ in {keys}); prepare both with the "
                    f"same codec and codec_checkpoint"
                )
        model = networks[network]
        if not callable(getattr(model, "generate", None)):
            raise ValueError(
                f"tts_samples: network {network!r} ({type(model).__name__}) has no generate()"
            )
        if teacher_forced_items and not all(
            callable(getattr(model, f, None)) for f in ("ar_logits", "item_losses")
        ):
            raise ValueError(
                f"tts_samples: network {network!r} ({type(model).__name__}) has "
                f"no ar_logits()/item_losses() for the teacher-forced scores; set "
                f"teacher_forced_items: 0"
            )
        self.sampling = dict(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            nar_temperature=nar_temperature,
            seed=seed,
        )
        self.codec_options = dict(codec_options or {})
        self._codec: nn.Module | None = None

    def codec(self) -> nn.Module:
        if self._codec is None:  # built at the first evaluation, not at start-up
            codec = build_codec_from_config(
                self.codec_config, self.codec_options, where=f"dataset {self.dataset_phase!r}"
            )
            self._codec = codec.to(self.env.device).eval()
        return self._codec

    def sample_rate(self) -> int:
        return int(self.codec().sample_rate)

    def _levels(self) -> int | None:
        return int(getattr(self.networks[self.network], "n_levels", 0)) or None

    def decode_reference(self, index: int, phase: str | None = None) -> torch.Tensor:
        codes = self.datasets[phase or self.dataset_phase][index]["codes"][: self._levels()]
        return decode_codes(self.codec(), [codes])[0]

    def teacher_forced(self, model: nn.Module) -> dict[str, float]:
        data = self.datasets[self.dataset_phase]
        sums = dict.fromkeys(TF_SUMS, 0.0)
        for _, items in self.batches(list(range(self.teacher_forced_items))):
            batch = to_device(data.collate(items), self.env.device)
            for k, v in teacher_forced_sums(model, batch).items():
                sums[k] += v
        return teacher_forced_metrics(sums)

    def speak(
        self, model: nn.Module, indices: list[int], items: list[dict[str, Any]], step: int
    ) -> list[tuple[torch.Tensor, int, int]]:
        n_levels = self._levels()
        want = [it["codes"][:n_levels] for it in items]
        codes = generate_codes(
            model,
            [it["phonemes"] for it in items],
            [it["prompt"][:n_levels] for it in items],
            max_frames=[self.frame_limit(c.shape[-1]) for c in want],
            device=self.env.device,
            **self.sampling,
        )
        wavs = decode_codes(self.codec(), codes)
        return [(w, g.shape[-1], r.shape[-1]) for w, g, r in zip(wavs, codes, want)]


def _codec_config(data: Any, phase: str) -> dict[str, Any]:
    config = getattr(data, "codec_config", None)
    if config is None and "codec" in getattr(data, "attrs", {}):
        config = json.loads(data.attrs["codec"])
    if not isinstance(config, dict):
        raise ValueError(
            f"tts_samples: dataset {phase!r} ({type(data).__name__}) has no codec "
            f"config; it needs an hdf5_codes dataset (a prepared data.h5)"
        )
    return config
