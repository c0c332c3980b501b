"""EnCodec codes in, Vocos vocoder out (``charactr/vocos-encodec-24khz``) as a :class:`Codec`.

Encoding is EnCodec's; decoding uses Vocos, which turns the same codes into cleaner audio than
EnCodec's own decoder. Vocos was trained for 1.5/3/6/12 kbps (2/4/8/16 levels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from encodec import EncodecModel
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from torch import nn
from vocos import Vocos
from vocos.feature_extractors import EncodecFeatures, FeatureExtractor
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

from models.audio.codecs.base import (
    Codec,
    CodecUnavailable,
    as_batch,
    register_codec,
    resolve_checkpoint,
)
from models.audio.codecs.encodec import EncodecCodec, check_codes, encodec_weights, seeded

VOCOS_REPO = "charactr/vocos-encodec-24khz"
VOCOS_WEIGHTS = "pytorch_model.bin"
VOCOS_BANDWIDTHS = (1.5, 3.0, 6.0, 12.0)  # bandwidth_id i <-> VOCOS_BANDWIDTHS[i]
# The repo's config.yaml (same as configs/vocos-encodec.yaml in gemelo-ai/vocos).
BACKBONE = dict(
    input_channels=128,
    dim=384,
    intermediate_dim=1152,
    num_layers=8,
    adanorm_num_embeddings=len(VOCOS_BANDWIDTHS),
)
HEAD = dict(dim=384, n_fft=1280, hop_length=320, padding="same")


class _EncodecCodebooks(EncodecFeatures):
    """Vocos's EnCodec feature extractor around an EnCodec model we already built.

    ``EncodecFeatures.__init__`` always downloads the pretrained EnCodec; this sets the same
    attributes from a given model instead, so the state-dict keys and
    ``Vocos.codes_to_features`` work unchanged, offline and with random weights.
    """

    def __init__(self, encodec: EncodecModel, bandwidths: tuple[float, ...]) -> None:
        FeatureExtractor.__init__(self)  # deliberately not EncodecFeatures.__init__
        self.encodec = encodec
        self.num_q = encodec.quantizer.get_num_quantizers_for_bandwidth(
            encodec.frame_rate, bandwidth=max(bandwidths)
        )
        weights = torch.cat([vq.codebook for vq in encodec.quantizer.vq.layers[: self.num_q]])
        self.codebook_weights = nn.Parameter(weights, requires_grad=False)
        self.bandwidths = list(bandwidths)


def vocos_cache_hint() -> Path:
    """Where the Hugging Face hub cache keeps the weights (the snapshot folder is a commit id)."""
    return (
        Path(constants.HF_HUB_CACHE)
        / repo_folder_name(repo_id=VOCOS_REPO, repo_type="model")
        / "snapshots"
        / "<commit>"
        / VOCOS_WEIGHTS
    )


def _vocos_weights(checkpoint: Path | None) -> Path:
    """``checkpoint`` (the .bin, or a folder holding it) or the hub cache's copy."""
    if checkpoint is not None and checkpoint.is_dir():
        checkpoint = checkpoint / VOCOS_WEIGHTS
    cached = try_to_load_from_cache(VOCOS_REPO, VOCOS_WEIGHTS)  # local lookup only
    default = Path(cached) if isinstance(cached, str) else vocos_cache_hint()
    return resolve_checkpoint(
        checkpoint,
        default,
        f"vocos ({VOCOS_REPO})",
        f"run `hf download {VOCOS_REPO}` on a machine with internet and copy its "
        f"cache folder {default.parents[2].name} into {constants.HF_HUB_CACHE} here, or download "
        f"https://huggingface.co/{VOCOS_REPO}/resolve/main/{VOCOS_WEIGHTS} and pass it (or its "
        f"folder) as `checkpoint:`",
    )


@register_codec("vocos")
class VocosCodec(Codec):
    """EnCodec 24 kHz codes decoded by Vocos.

    Args:
        bandwidth: kbps, one of 1.5, 3, 6, 12 (2, 4, 8, 16 levels).
        pretrained: load the released Vocos and EnCodec weights; false builds both networks
            with seeded random weights, for offline tests.
        checkpoint: Vocos's ``pytorch_model.bin``, or a folder holding it (default: the
            Hugging Face hub cache of charactr/vocos-encodec-24khz).
        encodec_checkpoint: EnCodec's weights (see the ``encodec`` codec's ``checkpoint``).
    """

    def __init__(
        self,
        bandwidth: float = 6.0,
        pretrained: bool = True,
        checkpoint: Path | None = None,
        encodec_checkpoint: Path | None = None,
    ) -> None:
        super().__init__()
        if float(bandwidth) not in VOCOS_BANDWIDTHS:
            raise ValueError(
                f"vocos: bandwidth {bandwidth} kbps is not one {VOCOS_REPO} was "
                f"trained for; use one of {list(VOCOS_BANDWIDTHS)}"
            )
        if not pretrained and checkpoint is not None:
            raise ValueError("vocos: `checkpoint` is only read with `pretrained: true`")
        weights = None
        if pretrained:  # report a missing Vocos file even when EnCodec's is missing too
            try:
                weights = _vocos_weights(Path(checkpoint) if checkpoint else None)
            except CodecUnavailable as vocos_missing:
                try:
                    encodec_weights(Path(encodec_checkpoint) if encodec_checkpoint else None)
                except CodecUnavailable as encodec_missing:
                    raise CodecUnavailable(f"{vocos_missing}\n{encodec_missing}") from None
                raise
        self.bandwidth, self.pretrained = float(bandwidth), pretrained
        self.encodec = EncodecCodec(bandwidth, pretrained, encodec_checkpoint)
        with seeded(0):
            self.vocos = Vocos(
                _EncodecCodebooks(self.encodec.model, VOCOS_BANDWIDTHS),
                VocosBackbone(**BACKBONE),
                ISTFTHead(**HEAD),
            )
        if weights is not None:
            self._load(weights)
        self.vocos.eval().requires_grad_(False)
        self.register_buffer(
            "bandwidth_id", torch.tensor([VOCOS_BANDWIDTHS.index(self.bandwidth)]), persistent=False
        )
        self.sample_rate = self.encodec.sample_rate
        self.frame_rate = self.encodec.frame_rate
        self.n_levels = self.encodec.n_levels
        self.codebook_size = self.encodec.codebook_size

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # As Vocos.from_pretrained does: the EnCodec part always comes from EnCodec's weights.
        state.update(
            {
                f"feature_extractor.encodec.{k}": v
                for k, v in self.encodec.model.state_dict().items()
            }
        )
        try:
            self.vocos.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"vocos: {path} is not the {VOCOS_REPO} {VOCOS_WEIGHTS} (another Vocos model?): {e}"
            ) from e

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.encodec.encode(wav)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes, added = as_batch(codes, 3)
        check_codes(codes, self.n_levels, self.codebook_size, "vocos")
        device = self.bandwidth_id.device
        features = self.vocos.codes_to_features(codes.to(device).transpose(0, 1))  # [K, B, F]
        wav = self.vocos.decode(features, bandwidth_id=self.bandwidth_id)  # [B, F * 320]
        # Vocos runs under inference_mode; a clone makes a normal tensor that autograd accepts.
        wav = wav.clone().to(codes.device)
        return wav[0] if added else wav

    def frames_for(self, num_samples: int) -> int:
        return self.encodec.frames_for(num_samples)

    def config(self) -> dict[str, Any]:
        """Name and the options that change the codes or the audio (not file locations)."""
        return {"name": "vocos", "bandwidth": self.bandwidth, "pretrained": self.pretrained}
