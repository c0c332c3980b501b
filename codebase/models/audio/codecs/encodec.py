"""EnCodec (Meta, 24 kHz mono, ``pip install encodec``) as a :class:`Codec`.

75 code frames per second (hop 320), 1024-entry codebooks; the bandwidth picks how many
residual levels are used: 1.5/3/6/12/24 kbps -> 2/4/8/16/32 levels. The 48 kHz stereo model
is out of scope: the framework works on mono audio.

Also home of two helpers the other pretrained backends share: :func:`seeded` (random weights
that are the same in every process) and :func:`check_codes`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from encodec import EncodecModel
from encodec.model import ROOT_URL

from models.audio.codecs.base import Codec, as_batch, register_codec, resolve_checkpoint

# The file `EncodecModel.encodec_model_24khz(pretrained=True)` fetches through torch.hub.
ENCODEC_24KHZ_FILE = "encodec_24khz-d7cc33bc.th"
ENCODEC_24KHZ_URL = ROOT_URL + ENCODEC_24KHZ_FILE
# Its target bandwidths (kbps), checked before building so a typo fails at once.
ENCODEC_24KHZ_BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)


def encodec_cache_path() -> Path:
    """Where torch.hub keeps the EnCodec weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ENCODEC_24KHZ_FILE


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run a block with a fixed CPU seed, leaving the caller's RNG untouched.

    ``pretrained: false`` codecs are built in here so that every process (data preparation,
    training, synthesis) gets the same random codec and codes written by one decode the same
    in another.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_weight_norm() -> Iterator[None]:
    """EnCodec and DAC call the deprecated ``torch.nn.utils.weight_norm``; the FutureWarning
    it prints for every layer says nothing a user of this framework can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        yield


def check_codes(codes: torch.Tensor, n_levels: int, codebook_size: int, what: str) -> None:
    """Codes must be integers of shape [B, n_levels, frames] within [0, codebook_size)."""
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"{what}.decode: codes must be an integer tensor, got {codes.dtype}")
    if codes.shape[1] != n_levels:
        raise ValueError(
            f"{what}.decode: codes have {codes.shape[1]} levels (shape "
            f"{tuple(codes.shape)}), the codec has {n_levels}; encode and decode "
            f"with the same codec options"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"{what}.decode: codes must lie in [0, {codebook_size}), got "
            f"[{int(codes.min())}, {int(codes.max())}]; replace padding ids "
            f"before decoding (or pass lengths to the codes_to_audio injector)"
        )


def check_audio(wav: torch.Tensor, what: str) -> None:
    """Audio must be a non-empty float tensor (an int16 tensor would encode as loud noise)."""
    if not wav.is_floating_point():
        raise TypeError(f"{what}.encode: audio must be a float tensor in [-1, 1], got {wav.dtype}")
    if wav.shape[-1] == 0:
        raise ValueError(f"{what}.encode: the audio is empty (shape {tuple(wav.shape)})")


def encodec_weights(checkpoint: Path | None) -> Path:
    """``checkpoint`` or torch.hub's copy; :class:`CodecUnavailable` names both if missing."""
    return resolve_checkpoint(
        checkpoint,
        encodec_cache_path(),
        "encodec (24 kHz)",
        f"download {ENCODEC_24KHZ_URL} on a machine with internet and copy it to "
        f"{encodec_cache_path()} (torch.hub's cache; $TORCH_HOME moves it), or pass its path "
        f"as `checkpoint:`",
    )


def build_encodec_24khz(pretrained: bool, checkpoint: Path | None) -> EncodecModel:
    """The 24 kHz EnCodec model, in eval mode, without any network access.

    Pretrained weights come from ``checkpoint`` or torch.hub's cache; otherwise the same
    architecture gets seeded random weights and usable codebooks (see
    :func:`_spread_codebooks`).
    """
    if not pretrained:
        if checkpoint is not None:
            raise ValueError("encodec: `checkpoint` is only read with `pretrained: true`")
        with seeded(0), quiet_weight_norm():
            model = EncodecModel.encodec_model_24khz(pretrained=False)  # builds, never downloads
            _spread_codebooks(model)
        return model.eval()
    path = encodec_weights(checkpoint)
    with quiet_weight_norm():
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # unpickling or key/shape errors: say which file is wrong
        raise ValueError(
            f"encodec: {path} is not the EnCodec 24 kHz state dict "
            f"({ENCODEC_24KHZ_FILE} from {ROOT_URL}): {e}"
        ) from e
    model.name = "encodec_24khz"  # what the package's own loader sets for pretrained weights
    return model.eval()


@torch.no_grad()
def _spread_codebooks(model: EncodecModel) -> None:
    """Give a random-weight EnCodec codebooks that follow the input.

    Untrained EnCodec codebooks are all zeros (they are k-means initialised on the first
    training batch), so every frame would get code 0. Instead each level draws its entries
    from a Gaussian fitted to that level's residuals of the encoder's output on quiet noise:
    codes then vary with the input as they do in a trained codec, at no k-means cost.
    """
    probe = torch.randn(1, 1, model.sample_rate // 2) * 0.1  # 0.5 s at -20 dBFS
    residual = model.encoder(probe)  # [1, dim, frames]
    for layer in model.quantizer.vq.layers:
        mean, std = residual.mean(dim=2), residual.std(dim=2)  # [1, dim]
        layer.codebook.copy_(mean + std * torch.randn_like(layer.codebook))  # [bins, dim]
        residual = residual - layer.decode(layer.encode(residual))


@register_codec("encodec")
class EncodecCodec(Codec):
    """Meta's EnCodec, 24 kHz mono.

    Args:
        bandwidth: kbps; one of 1.5, 3, 6, 12, 24 (2, 4, 8, 16, 32 levels). VALL-E uses 6.
        pretrained: load the released weights (from ``checkpoint`` or torch.hub's cache);
            false builds the same network with seeded random weights, for offline tests.
        checkpoint: a local copy of ``encodec_24khz-d7cc33bc.th``.
        model: only "24khz": the 48 kHz model is stereo and the framework is mono.
    """

    def __init__(
        self,
        bandwidth: float = 6.0,
        pretrained: bool = True,
        checkpoint: Path | None = None,
        model: Literal["24khz"] = "24khz",
    ) -> None:
        super().__init__()
        if model != "24khz":
            raise ValueError(
                f"encodec: model {model!r} is not supported; only '24khz' (the "
                f"48 kHz EnCodec is stereo, this framework is mono)"
            )
        if float(bandwidth) not in ENCODEC_24KHZ_BANDWIDTHS:
            raise ValueError(
                f"encodec: bandwidth {bandwidth} kbps is not one the 24 kHz model "
                f"was trained for; use one of {list(ENCODEC_24KHZ_BANDWIDTHS)}"
            )
        self.bandwidth, self.pretrained, self.model_name = float(bandwidth), pretrained, model
        self.model = build_encodec_24khz(pretrained, Path(checkpoint) if checkpoint else None)
        self.model.set_target_bandwidth(self.bandwidth)
        self.model.requires_grad_(False)
        self.sample_rate = self.model.sample_rate
        self.hop_length = math.prod(self.model.encoder.ratios)
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_levels = self.model.quantizer.get_num_quantizers_for_bandwidth(
            self.model.frame_rate, self.bandwidth
        )
        self.codebook_size = self.model.quantizer.bins

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav, added = as_batch(wav, 2)
        check_audio(wav, "encodec")
        # The 24 kHz model has no segmenting: one frame tuple (codes [B, K, frames], scale None).
        ((codes, _),) = self.model.encode(wav.to(self.device, torch.float32).unsqueeze(1))
        codes = codes.long().to(wav.device)
        return codes[0] if added else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes, added = as_batch(codes, 3)
        check_codes(codes, self.n_levels, self.codebook_size, "encodec")
        wav = self.model.decode([(codes.to(self.device), None)])[:, 0]  # [B, frames * hop]
        wav = wav.to(codes.device)
        return wav[0] if added else wav

    def frames_for(self, num_samples: int) -> int:
        """The encoder pads the end to a whole hop: ``ceil(num_samples / 320)``."""
        return -(-num_samples // self.hop_length)

    def config(self) -> dict[str, Any]:
        """Name and the options that change the codes. The checkpoint path is left out: the
        same weights give the same codes wherever the file lies."""
        return {
            "name": "encodec",
            "bandwidth": self.bandwidth,
            "model": self.model_name,
            "pretrained": self.pretrained,
        }
