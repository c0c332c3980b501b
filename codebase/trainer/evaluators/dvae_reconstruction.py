"""``dvae_reconstruction``: how well a DVAE (``lucidrains_dvae``) rebuilds held-out mels, and how
much of its codebook it uses.

YAML (the DVAE recipe's ``eval`` section)::

    eval:
      every: 500
      at_start: true
      evaluators:
        recon: {type: dvae_reconstruction, dataset: val, items: 64, num_samples: 4}

The DVAE's input mels are made by the experiment's own injectors (the step that trains it, in
eval mode up to its ``generator`` injector; crops are drawn from a fixed seed, so every
evaluation sees the same mels and training's random stream is untouched). Scalars (logged as
``eval/<name>``):

- ``recon_mse``: mean squared error of the decoded codes against the input, in the DVAE's
  (normalised mel) space, over the first ``items`` held-out items;
- ``codes_used``, ``dead_codes``, ``usage_fraction`` and ``perplexity`` (exp of the entropy of
  the code histogram: the number of equally used codes it equals) over those items; dead codes
  are a known DVAE failure (``dead_code_threshold`` re-seeds them in training);
- ``reseeded_total``: dead codes re-seeded in training so far (since the process started).

The first ``num_samples`` items are written as ``samples/<step>/<id>_mel.wav`` /
``<id>_recon.wav`` (both through the inverse of the mel injector, Griffin-Lim, so the two
differ only by what the DVAE lost) with images of the input and reconstructed mels, and logged
to TensorBoard under ``samples/<id>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.audio.tts.lucidrains_dvae import code_usage
from trainer.component import TrainerEnv
from trainer.evaluators.base import TrackedEvaluator, check_network_and_dataset
from trainer.evaluators.speech_samples import item_speakers, round_robin, safe_name, to_device
from trainer.evaluators.step_inputs import StepInputs
from trainer.injectors.audio import TorchMelSpectrogramInjector
from trainer.logger import mel_image
from utils.audio import save_audio, save_mel_png
from utils.schema import Runtime


class DvaeReconstructionEvaluator(TrackedEvaluator):
    """Reconstruction error and codebook usage of a DVAE on held-out mels (module docstring).

    Args:
        network: the DVAE.
        dataset: the dataset phase whose items are encoded.
        step: the step whose injectors make the DVAE's input (None: the step training it).
        items: how many items (the first N) are scored.
        num_samples: how many of them (in turn from each speaker) are written as audio and
            images.
        batch_size: items per batch.
        seed: seeds the injectors' random choices (crops) during the evaluation.
        griffin_lim_iters: Griffin-Lim iterations per written clip.
    """

    REPORT_ROWS = (
        ("recon_mse", "held-out reconstruction MSE"),
        ("codes_used", "codes used on held-out mels"),
        ("dead_codes", "  codes never used"),
        ("perplexity", "code perplexity (equally used codes)"),
        ("reseeded_total", "dead codes re-seeded so far"),
    )

    def __init__(
        self,
        network: str = "dvae",
        dataset: str = "val",
        step: str | None = None,
        items: int = 64,
        num_samples: int = 4,
        batch_size: int = 16,
        seed: int = 0,
        griffin_lim_iters: int = 32,
        networks: Runtime[dict[str, nn.Module]] = None,
        env: Runtime[TrainerEnv] = None,
        datasets: Runtime[dict[str, Any]] = None,
        logger: Runtime[Any] = None,
        steps: Runtime[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_network_and_dataset("dvae_reconstruction", network, dataset, networks, datasets)
        model = networks[network]
        if not all(hasattr(model, f) for f in ("get_codebook_indices", "decode", "num_tokens")):
            raise ValueError(
                f"dvae_reconstruction: network {network!r} ({type(model).__name__}) is not a "
                f"DVAE (get_codebook_indices / decode)"
            )
        if items < 1 or num_samples < 0 or batch_size < 1 or griffin_lim_iters < 1:
            raise ValueError(
                f"dvae_reconstruction: need items >= 1, num_samples >= 0, batch_size >= 1 and "
                f"griffin_lim_iters >= 1, got {items}, {num_samples}, {batch_size}, "
                f"{griffin_lim_iters}"
            )
        self.inputs = StepInputs(steps, network, ("mel",), step, "dvae_reconstruction")
        self.mel = self.inputs.producer(self.inputs.keys["mel"], TorchMelSpectrogramInjector)
        if self.mel is None:
            raise ValueError(
                f"dvae_reconstruction: the DVAE's input {self.inputs.keys['mel']!r} must come "
                f"from a torch_mel_spectrogram injector of step {self.inputs.step_name!r} (its "
                f"inverse turns mels into audio)"
            )
        data = datasets[dataset]
        self.items = min(items, len(data))
        self.samples = set(round_robin(item_speakers(data)[: self.items], num_samples))
        self.network, self.dataset_phase = network, dataset
        self.batch_size, self.seed, self.griffin_lim_iters = batch_size, seed, griffin_lim_iters
        self.networks, self.env, self.datasets, self.logger = networks, env, datasets, logger
        self.history = []

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        model = self.networks[self.network]
        was_training = model.training
        model.eval()
        device = self.env.device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                results = self._score(model, step)
        finally:
            model.train(was_training)
        usage = getattr(model, "codebook_usage", None)
        if callable(usage):
            stats = usage()
            results["reseeded_total"] = float(stats["reseeded_total"])
        self.history.append((step, dict(results)))
        return results

    def _score(self, model: nn.Module, step: int) -> dict[str, float]:
        data = self.datasets[self.dataset_phase]
        counts = torch.zeros(model.num_tokens, dtype=torch.long)
        squared, values = 0.0, 0
        for start in range(0, self.items, self.batch_size):
            indices = list(range(start, min(start + self.batch_size, self.items)))
            items = [data[j] for j in indices]
            batch = to_device(data.collate(items), self.env.device)
            mel = self.inputs.prepare(batch, step)[self.inputs.keys["mel"]].float()
            codes = model.get_codebook_indices(mel)  # [B, F']
            recon = model.decode(codes)[0][..., : mel.shape[-1]]  # [B, C, F]
            target = model.norm(mel)
            squared += float((recon - target).pow(2).sum())
            values += target.numel()
            counts += torch.bincount(codes.flatten().cpu(), minlength=model.num_tokens)
            for b, j in enumerate(indices):
                if j in self.samples:
                    name = safe_name(Path(str(items[b].get("path", f"item{j}"))).stem)
                    self._write(name, mel[b], recon[b], model, step)
        usage = code_usage(counts)
        return {
            "recon_mse": squared / max(values, 1),
            "codes_used": usage["codes_used"],
            "dead_codes": usage["dead_codes"],
            "usage_fraction": usage["usage_fraction"],
            "perplexity": usage["perplexity"],
        }

    def _write(
        self, name: str, mel: torch.Tensor, recon: torch.Tensor, model: nn.Module, step: int
    ) -> None:
        """Input and reconstruction: images of the DVAE's mels, audio through the inverse of
        the mel injector (undoing the DVAE's own normalisation first)."""
        folder = self.samples_folder(step)
        sr = self.mel.sample_rate
        denorm = _denormalize(model, recon)
        for suffix, m, source in (("mel", model.norm(mel), mel), ("recon", recon, denorm)):
            wav = self.mel.to_audio(source[None], self.griffin_lim_iters)[0].cpu()
            image = m.detach().float().cpu()
            save_audio(folder / f"{name}_{suffix}.wav", wav, sr)
            save_mel_png(folder / f"{name}_{suffix}.png", image, title=f"{name} {suffix} ({step})")
            if self.logger is not None:
                self.logger.log_audio(f"samples/{name}_{suffix}", wav, sr, step)
                self.logger.log_image(f"samples/{name}_{suffix}_mel", mel_image(image), step)

    def samples_folder(self, step: int) -> Path:
        return self.env.run_dir / "samples" / str(step)


def _denormalize(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Undo the DVAE's ``normalization`` (per-channel means, stds) when it has one."""
    if getattr(model, "normalization", None) is None:
        return x
    means, stds = (torch.as_tensor(t).to(x)[:, None] for t in model.normalization)
    return x * stds + means
