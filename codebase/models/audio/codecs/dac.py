"""Descript Audio Codec (``pip install -e '.[dac]'``, import ``dac``) as a :class:`Codec`.

The package is optional (it pins an old protobuf), so it is imported only when a DAC codec is
built; without it the error says how to install it. Models (the 8 kbps releases):

========  ===========  =====  ==========  ======
type      sample rate  hop    frames/s    levels
========  ===========  =====  ==========  ======
24khz     24000        320    75          32
16khz     16000        320    50          12
44khz     44100        512    86.13       9
========  ===========  =====  ==========  ======
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F

from models.audio.codecs.base import (
    Codec,
    CodecUnavailable,
    as_batch,
    register_codec,
    resolve_checkpoint,
)
from models.audio.codecs.encodec import check_audio, check_codes, quiet_weight_norm, seeded

# DAC's constructor arguments per model, from conf/final/{24khz,16khz,44khz}.yml of
# descript-audio-codec (the released weights carry the same values in their metadata).
_COMMON = dict(encoder_dim=64, decoder_dim=1536, codebook_size=1024, codebook_dim=8)
DAC_ARCH: dict[str, dict[str, Any]] = {
    "24khz": dict(
        _COMMON,
        sample_rate=24000,
        encoder_rates=[2, 4, 5, 8],
        decoder_rates=[8, 5, 4, 2],
        n_codebooks=32,
    ),
    "16khz": dict(
        _COMMON,
        sample_rate=16000,
        encoder_rates=[2, 4, 5, 8],
        decoder_rates=[8, 5, 4, 2],
        n_codebooks=12,
    ),
    "44khz": dict(
        _COMMON,
        sample_rate=44100,
        encoder_rates=[2, 4, 8, 8],
        decoder_rates=[8, 8, 4, 2],
        n_codebooks=9,
    ),
}
BITRATE = "8kbps"  # the release every model type has


def import_dac() -> ModuleType:
    """The ``dac`` package, or :class:`CodecUnavailable` saying how to install it."""
    try:
        import dac
        import dac.utils
    except ImportError as e:
        raise CodecUnavailable(
            f"the dac codec needs the descript-audio-codec package ({e}): run "
            "`pip install -e '.[dac]'` from the repository root. Its dependency "
            "descript-audiotools pins protobuf<3.20, which newer wandb and tensorboard reject, "
            "so a separate virtual environment is the safe place for it"
        ) from None
    return dac


def dac_weights_location(dac: ModuleType, model_type: str) -> tuple[Path, str]:
    """(cache file, download URL) exactly as ``dac.utils.download`` would use them."""
    tag = dac.utils.__MODEL_LATEST_TAGS__[(model_type, BITRATE)]
    url = dac.utils.__MODEL_URLS__[(model_type, tag, BITRATE)]
    name = f"weights_{model_type}_{BITRATE}_{tag}.pth"
    return Path.home() / ".cache" / "descript" / "dac" / name, url


@register_codec("dac")
class DacCodec(Codec):
    """Descript Audio Codec.

    Args:
        model_type: "24khz", "44khz" or "16khz" (see the table in the module docstring).
        n_levels: residual levels to keep (DAC is trained with quantizer dropout, so a prefix
            decodes well); null keeps all of them.
        pretrained: load the released weights (from ``checkpoint`` or DAC's cache); false
            builds the same network with seeded random weights, for offline tests.
        checkpoint: a local copy of the release's ``weights_*.pth``.
    """

    def __init__(
        self,
        model_type: Literal["24khz", "44khz", "16khz"] = "24khz",
        n_levels: int | None = None,
        pretrained: bool = True,
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__()
        if model_type not in DAC_ARCH:
            raise ValueError(
                f"dac: unknown model_type {model_type!r}; use one of {sorted(DAC_ARCH)}"
            )
        arch = DAC_ARCH[model_type]
        if n_levels is not None and not 1 <= n_levels <= arch["n_codebooks"]:
            raise ValueError(
                f"dac: n_levels must be between 1 and {arch['n_codebooks']} for the "
                f"{model_type} model, got {n_levels}"
            )
        if not pretrained and checkpoint is not None:
            raise ValueError("dac: `checkpoint` is only read with `pretrained: true`")
        dac = import_dac()
        if pretrained:
            cache, url = dac_weights_location(dac, model_type)
            path = resolve_checkpoint(
                checkpoint,
                cache,
                f"dac ({model_type})",
                f"download {url} on a machine with internet and copy it to {cache} (DAC's own "
                f"cache), or pass its path as `checkpoint:`",
            )
            try:
                with quiet_weight_norm():  # rebuilds the network from the file's own metadata
                    self.model = dac.DAC.load(str(path))
            except Exception as e:  # unpickling or key errors: say which file is wrong
                raise ValueError(f"dac: {path} is not a DAC weights file ({e})") from e
            if self.model.sample_rate != arch["sample_rate"]:
                raise ValueError(
                    f"dac: {path} holds a {self.model.sample_rate} Hz model, but "
                    f"model_type is {model_type!r}; fix one of them"
                )
        else:
            with seeded(0), quiet_weight_norm():
                self.model = dac.DAC(**arch)
        self.model.eval().requires_grad_(False)
        self.model_type, self.pretrained = model_type, pretrained
        self.sample_rate = int(self.model.sample_rate)
        self.hop_length = int(self.model.hop_length)
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_levels = n_levels or int(self.model.n_codebooks)
        self.codebook_size = int(self.model.codebook_size)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav, added = as_batch(wav, 2)
        check_audio(wav, "dac")
        x = wav.to(self.device, torch.float32).unsqueeze(1)  # [B, 1, T]
        x = self.model.preprocess(x, self.sample_rate)  # right-pads to a whole hop
        _, codes, *_ = self.model.encode(x, n_quantizers=self.n_levels)
        codes = codes[:, : self.n_levels].long().to(wav.device)  # DAC returns every level
        return codes[0] if added else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes, added = as_batch(codes, 3)
        check_codes(codes, self.n_levels, self.codebook_size, "dac")
        z = self.model.quantizer.from_codes(codes.to(self.device))[0]  # [B, latent, frames]
        wav = self.model.decode(z)[:, 0]
        # The 24/16 kHz decoders (stride-5 layers) end 8 samples short of frames * hop: pad (or
        # trim) so that every codec returns frames * hop samples.
        wav = F.pad(wav, (0, codes.shape[-1] * self.hop_length - wav.shape[-1])).to(codes.device)
        return wav[0] if added else wav

    def frames_for(self, num_samples: int) -> int:
        return -(-num_samples // self.hop_length)  # preprocess pads to a whole hop

    def config(self) -> dict[str, Any]:
        """Name and the options that change the codes (not file locations)."""
        return {
            "name": "dac",
            "model_type": self.model_type,
            "n_levels": self.n_levels,
            "pretrained": self.pretrained,
        }
