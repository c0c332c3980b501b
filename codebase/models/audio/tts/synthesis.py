"""Text + a voice prompt -> speech, with a VALL-E checkpoint written by the trainer.

A network file carries everything inference needs in its safetensors metadata: the model's
registry name and kwargs, the phoneme vocab, the phonemizer options and the codec config. So
``Synthesizer.from_checkpoint(path)`` needs no YAML and no data file::

    synth = Synthesizer.from_checkpoint("experiments/valle/models/50000_valle_ema.safetensors")
    prompt = synth.encode_prompt("reference.wav", seconds=3.0)        # codes [levels, frames]
    wavs = synth.synthesize(["Hello there.", "How are you?"], prompt, seed=0)
    save_audio("hello.wav", wavs[0], synth.sample_rate)

The batching helpers (:func:`pad_batch`, :func:`generate_codes`, :func:`decode_codes`) are shared
with the ``tts_samples`` evaluator, which starts from phoneme ids instead of text.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from data.audio.phonemes import PhonemeVocab, Phonemizer, foreign_characters
from data.loader import pad_batch
from models import MODELS, build_network
from models.audio.codecs import CODECS, build_codec
from models.audio.tts.synthesis_common import (  # noqa: F401 - part of this module's API
    MAX_DURATION_CAP,
    EmptyPrompt,
    NotASynthesisCheckpoint,
    SynthesisError,
    sampling_problems,
)
from models.lora import load_adapted
from utils.audio import load_audio
from utils.distributed import resolve_device
from utils.errors import CheckpointError
from utils.io import load_module, read_network_metadata
from utils.schema import ConfigError, Problems, bind_options

REQUIRED_METADATA = ("phoneme_vocab", "phonemizer", "codec")
# Networks synthesis knows how to drive; imported on demand so that they are registered.
_NETWORK_MODULES = {"valle": "models.audio.tts.valle"}


# ----------------------------------------------------------------------------- batch helpers


@torch.no_grad()
def generate_codes(
    model: nn.Module,
    phonemes: Sequence[torch.Tensor],
    prompts: Sequence[torch.Tensor],
    *,
    max_frames: int | Sequence[int],
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    nar_temperature: float = 0.0,
    seed: int | None = None,
) -> list[torch.Tensor]:
    """One batched ``model.generate``: phoneme ids [P_i] (bos..eos) and prompt codes
    [levels, F_i] per item -> generated codes [levels, n_i] per item (on the CPU).

    ``max_frames`` is one limit, or one per item: the batch runs to the largest and each item is
    cut to its own, so a batch costs no more than its longest item.
    """
    n = len(phonemes)
    if n != len(prompts):
        raise ValueError(f"generate_codes: {n} phoneme sequences but {len(prompts)} prompts")
    limits = (
        [int(max_frames)] * n
        if isinstance(max_frames, (int, float))
        else [int(m) for m in max_frames]
    )
    if len(limits) != n or min(limits, default=1) < 1:
        raise ValueError(f"generate_codes: max_frames must be >= 1 per item, got {max_frames}")
    device = torch.device(device)
    ph, ph_lengths = pad_batch([p.long() for p in phonemes])
    pr, pr_lengths = pad_batch([p.long() for p in prompts])
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    codes, lengths = model.generate(
        ph.to(device),
        ph_lengths.to(device),
        pr.to(device),
        pr_lengths.to(device),
        max_frames=max(limits),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        nar_temperature=nar_temperature,
        generator=generator,
    )
    codes, lengths = codes.cpu(), lengths.cpu()
    return [codes[b, :, : min(int(lengths[b]), limits[b])] for b in range(n)]


@torch.no_grad()
def decode_codes(codec: nn.Module, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Codes [levels, n_i] per item -> waveform [T_i] per item (float32, CPU).

    Items are decoded one by one: padding a batch would let the pad frames bleed into the end
    of shorter items (Griffin-Lim, convolutional decoders).
    """
    device = next((b.device for b in codec.buffers()), torch.device("cpu"))
    wavs = []
    for c in codes:
        if c.shape[-1] == 0:  # nothing generated: some decoders fail on empty input
            wavs.append(torch.zeros(0))
            continue
        wavs.append(codec.decode(c.to(device)).float().cpu().reshape(-1))
    return wavs


def build_codec_from_config(
    config: dict[str, Any], overrides: dict[str, Any] | None = None, where: str = "the checkpoint"
) -> nn.Module:
    """A codec from its saved config (``{"name": ..., **options}``) with ``overrides`` applied."""
    name, options = check_codec_options(config, overrides, where)
    return build_codec(name, **options)


def check_codec_options(
    config: dict[str, Any], overrides: dict[str, Any] | None = None, where: str = "the checkpoint"
) -> tuple[str, dict[str, Any]]:
    """``(codec name, options)`` of a saved codec config with ``overrides`` applied, checked
    against the codec's constructor: an unknown name or option raises ``ConfigError`` with the
    closest valid ones, before anything is built."""
    options = {**config, **(overrides or {})}
    name = options.pop("name", None)
    if not name:
        raise NotASynthesisCheckpoint(
            f"the codec config of {where} has no 'name' ({config}); pass "
            f"codec_options={{'name': ...}}"
        )
    target = CODECS.get(name)  # an unknown name: RegistryError listing the closest
    problems = Problems()
    bind_options(target, options, "", problems)
    if problems:
        overridden = f" with the overrides {sorted(overrides)}" if overrides else ""
        raise ConfigError(problems.items, f"the {name!r} codec options of {where}{overridden}")
    return name, options


def _merged_network(base: Path, lora: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The base network with ``lora``'s adapters merged in, and the metadata synthesis reads:
    the base file's (when it is a network file), overridden by the adapter file's."""
    if not lora.is_file():
        raise NotASynthesisCheckpoint(f"--lora {lora} does not exist")
    model, adapters = load_adapted(lora, base=base)
    try:
        meta = read_network_metadata(base)
    except CheckpointError:  # e.g. Tortoise's autoregressive.pth: the adapter file has it all
        meta = {}
    meta = {**meta, **adapters.extra, "which_model": adapters.which_model}
    return model, {**meta, "kwargs": adapters.kwargs}


# ----------------------------------------------------------------------------- synthesizer


class Synthesizer:
    """A trained VALL-E with the phonemizer, vocab and codec it was trained with.

    Args:
        model: a network with VALL-E's ``generate`` (see :mod:`models.audio.tts.valle`).
        vocab: the :class:`data.audio.phonemes.PhonemeVocab` of its training data.
        phonemizer: the :class:`data.audio.phonemes.Phonemizer` that made those symbols.
        codec: the codec whose codes the model predicts.
        device: where the model and codec run.
    """

    def __init__(
        self,
        model: nn.Module,
        vocab: Any,
        phonemizer: Any,
        codec: nn.Module,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.phonemizer = phonemizer
        self.codec = codec.to(self.device).eval()
        self.n_levels = int(getattr(model, "n_levels", codec.n_levels))
        if self.n_levels > codec.n_levels:
            raise SynthesisError(
                f"the model predicts {self.n_levels} codebook levels but the codec "
                f"{type(codec).__name__} has only {codec.n_levels}; build the codec "
                f"with at least {self.n_levels} (e.g. encodec `bandwidth`)"
            )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        codec_options: dict[str, Any] | None = None,
        lora: str | Path | None = None,
    ) -> Synthesizer:
        """Load a network file written by the trainer (``models/<step>_<net>[_ema].safetensors``).

        ``codec_options`` override or extend the stored codec config, e.g. ``{"checkpoint":
        "/new/place/data_mel_rvq.safetensors"}`` when the run folder moved.

        ``lora``: an adapter file (``<step>_<net>[_ema]_lora.safetensors``) trained on ``path``
        (its SHA-256 is checked): they are merged into it, and the adapter file's metadata (the
        fine-tuning data's vocabulary and codec) is used.

        A ``unified_voice2`` (Tortoise GPT) file gives a
        :class:`models.audio.tts.tortoise_synthesis.TortoiseSynthesizer` (same methods; its
        ``codec_options`` are ``dvae_weights`` and ``griffin_lim_iters``).
        """

        path = Path(path)
        if not path.is_file():
            raise NotASynthesisCheckpoint(
                f"model file {path} does not exist; pass a network file the trainer wrote "
                f"(<run folder>/models/<step>_<net>[_ema].safetensors)"
            )
        model = None
        try:
            if lora is None:
                meta = read_network_metadata(path)
            else:
                model, meta = _merged_network(path, Path(lora))
        except ValueError as e:  # utils.io names the file and what is wrong with it
            raise NotASynthesisCheckpoint(str(e)) from e
        if meta.get("which_model") == "unified_voice2":  # Tortoise's GPT: its own front end
            from models.audio.tts.tortoise_synthesis import TortoiseSynthesizer

            return TortoiseSynthesizer.from_metadata(path, meta, device, codec_options, model)
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise NotASynthesisCheckpoint(
                f"{path} has no {', '.join(repr(k) for k in missing)} metadata, so its text "
                f"front end or codec is unknown; synthesis needs a VALL-E checkpoint saved by this "
                f"trainer from a prepared data.h5 (hdf5_codes dataset), which stores "
                f"{list(REQUIRED_METADATA)} in every network file"
            )
        try:
            vocab = PhonemeVocab.from_json(meta["phoneme_vocab"])
            phonemizer_config = json.loads(meta["phonemizer"])
            codec_config = json.loads(meta["codec"])
        except (ValueError, TypeError) as e:
            raise NotASynthesisCheckpoint(
                f"{path}: unreadable synthesis metadata ({e}); re-save the "
                f"checkpoint with this trainer"
            ) from e
        # the cheap checks first: a misspelled codec option fails before the model loads
        check_codec_options(codec_config, codec_options, where=str(path))
        phonemizer = Phonemizer(**phonemizer_config)
        which = meta["which_model"]
        if which in _NETWORK_MODULES and which not in MODELS.names():
            importlib.import_module(_NETWORK_MODULES[which])
        if model is None:
            model = build_network(which, meta["kwargs"])
            try:
                load_module(model, path, strict=True)
            except ValueError as e:  # weights that do not fit the stored kwargs, or corrupt
                raise NotASynthesisCheckpoint(str(e)) from e
        if not callable(getattr(model, "generate", None)):
            raise NotASynthesisCheckpoint(
                f"{path} holds a {which!r} network, which has no generate(); "
                f"synthesis needs a VALL-E checkpoint"
            )
        codec = build_codec_from_config(codec_config, codec_options, where=str(path))
        return cls(model, vocab, phonemizer, codec, device=device)

    # ------------------------------------------------------------------------- properties

    @property
    def sample_rate(self) -> int:
        """Hz of the audio :meth:`synthesize` returns (the codec's)."""
        return int(self.codec.sample_rate)

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return float(self.codec.frame_rate)

    def prompt_seconds(self, prompt: torch.Tensor) -> float:
        """Seconds of voice in an encoded prompt."""
        return prompt.shape[-1] / self.frame_rate

    # ------------------------------------------------------------------------- inputs

    @torch.no_grad()
    def encode_prompt(
        self,
        audio: str | Path | torch.Tensor,
        seconds: float | None = 3.0,
        sample_rate: int | None = None,
    ) -> torch.Tensor:
        """A voice prompt as codes [levels, frames]: the first ``seconds`` (None: all) of a file,
        or of a waveform tensor [T] at ``sample_rate`` (default: the codec's)."""

        if isinstance(audio, (str, Path)):
            wav, _ = load_audio(audio, self.sample_rate)
        else:
            wav = audio.detach().float().cpu()
            if wav.dim() == 2:  # [C, T]
                wav = wav.mean(0)
            if wav.dim() != 1:
                raise SynthesisError(
                    f"encode_prompt: expected a waveform [T] or [C, T], got shape "
                    f"{tuple(audio.shape)}"
                )
            rate = sample_rate or self.sample_rate
            if rate != self.sample_rate:
                import torchaudio.functional as AF

                wav = AF.resample(wav, rate, self.sample_rate)
        if seconds is not None:
            if seconds <= 0:
                raise SynthesisError(f"encode_prompt: seconds must be > 0 (or None), got {seconds}")
            wav = wav[: int(round(seconds * self.sample_rate))]
        if wav.numel() == 0:
            where = f" {audio}" if isinstance(audio, (str, Path)) else ""
            raise EmptyPrompt(f"the prompt audio{where} is empty; give a recording of the voice")
        codes = self.codec.encode(wav.to(self.device)).cpu()  # [codec levels, frames]
        return codes[: self.n_levels]

    def phoneme_ids(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Texts -> phoneme ids [P] framed by bos/eos, as the model was trained on."""
        symbols = self.phonemizer.phonemize_symbols(list(texts))
        empty = [i for i, s in enumerate(symbols) if not s]
        if empty:
            raise SynthesisError(
                f"text {empty[0]} ({texts[empty[0]]!r}) gives no phonemes; give words to speak"
            )
        return [torch.tensor(self.vocab.encode(s, add_bos_eos=True)) for s in symbols]

    def text_warnings(self, texts: Sequence[str]) -> list[str]:
        """What this model cannot say in each text, as messages naming the characters and the
        text: letters of a script the phonemizer's language does not read (Chinese characters
        for an English voice are spoken as "Chinese letter"), and phonemes outside the model's
        vocab (spoken as ``<unk>``)."""
        language = self.phonemizer.language
        out = []
        symbols = self.phonemizer.phonemize_symbols(list(texts))
        for text, syms in zip(texts, symbols):
            foreign = foreign_characters(text, language)
            if foreign:
                out.append(
                    f"{''.join(foreign)!r} in {text!r} cannot be spoken in {language!r} (the "
                    f"model's language): espeak reads such characters out by name or spells "
                    f"them; write the text in that language"
                )
            unknown = sorted({s for s in syms if s not in self.vocab})
            if unknown:
                out.append(
                    f"phonemes {unknown} of {text!r} are not in the model's vocab and become "
                    f"<unk>; the training data never had them"
                )
        return out

    def max_frames(self, max_duration: float) -> int:
        """Code frames in ``max_duration`` seconds (at least 1), checked against the cap."""
        if not 0 < max_duration <= MAX_DURATION_CAP:
            raise SynthesisError(
                f"max_duration must be in (0, {MAX_DURATION_CAP:g}] seconds, got {max_duration}"
            )
        return max(1, math.floor(max_duration * self.frame_rate))

    # ------------------------------------------------------------------------- synthesis

    @torch.no_grad()
    def synthesize(
        self,
        texts: Sequence[str],
        prompt: torch.Tensor | Sequence[torch.Tensor],
        **options: Any,
    ) -> list[torch.Tensor]:
        """Speak each text in the prompt's voice: one waveform [T] (CPU, ``sample_rate``) per
        text, all generated as one batch. ``options`` are those of :meth:`generate`."""
        return self.decode(self.generate(texts, prompt, **options))

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes [levels, n_i] per item (from :meth:`generate`) -> waveform [T_i] per item."""
        return decode_codes(self.codec, codes)

    @torch.no_grad()
    def generate(
        self,
        texts: Sequence[str],
        prompt: torch.Tensor | Sequence[torch.Tensor],
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        max_duration: float = 20.0,
        seed: int | None = None,
        nar_temperature: float = 0.0,
    ) -> list[torch.Tensor]:
        """The codes [levels, n_i] (CPU) of each text spoken in the prompt's voice, all
        generated as one batch.

        ``prompt`` is codes [levels, frames] for every text (see :meth:`encode_prompt`), or one
        per text. ``max_duration`` caps each output in seconds: an output of
        ``max_frames(max_duration)`` frames was cut there. ``seed`` makes sampling repeatable.
        """
        if isinstance(texts, str):
            raise TypeError("synthesize takes a list of texts; wrap one text in a list")
        if not texts:
            return []
        prompts = [prompt] * len(texts) if isinstance(prompt, torch.Tensor) else list(prompt)
        if len(prompts) != len(texts):
            raise SynthesisError(f"synthesize: {len(texts)} texts but {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if p.dim() != 2 or p.shape[0] < self.n_levels:
                raise SynthesisError(
                    f"synthesize: prompt {i} must be codes [levels >= "
                    f"{self.n_levels}, frames], got shape {tuple(p.shape)}"
                )
        prompts = [p[: self.n_levels] for p in prompts]
        problems = sampling_problems(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            nar_temperature=nar_temperature,
            max_duration=max_duration,
        )
        if problems:
            raise SynthesisError("; ".join(f"{name} {msg}" for name, msg in problems))
        max_frames = self.max_frames(max_duration)
        return generate_codes(
            self.model,
            self.phoneme_ids(texts),
            prompts,
            max_frames=max_frames,
            device=self.device,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            nar_temperature=nar_temperature,
            seed=seed,
        )
