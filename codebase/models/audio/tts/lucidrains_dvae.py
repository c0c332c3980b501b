"""DLAS's ``lucidrains_dvae``: a discrete VAE over mel spectrograms (Tortoise's ``dvae.pth``).

A strided 1-D conv encoder maps a normalised log-mel [B, C, F] to [B, D, F'] (F' = F / stride
per layer, rounded up); every frame snaps to its nearest codebook column (``Quantize``, an
EMA-trained codebook); the decoder upsamples the codes' vectors back to a mel. The state-dict
names and shapes are DLAS's, so Tortoise's ``dvae.pth`` loads strictly; the code is written
from the behaviour DLAS documents (see the README's DVAE section), not copied.

    encoder: [conv(stride) act] * num_layers, ResBlock * num_resnet_blocks, conv 1x1 -> D
    decoder: conv 1x1 D -> hidden, ResBlock * num_resnet_blocks, [upsample+conv act] * num_layers,
             conv 1x1 -> C
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import register_model
from utils.schema import NonNegativeInt, PositiveInt, Range

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}
_LIVE_FLOOR = 1e-3  # EMA count below which a code counts as dead when re-seeding is off


def code_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage figures of a codebook from a histogram of code counts [n] (or EMA counts).

    ``codes_used``: codes with count > 0; ``dead_codes``: n - used; ``perplexity``: exp of the
    entropy of the normalised histogram (n when uniform, 1 when one code takes everything, 0
    for an empty histogram); ``usage_fraction``: used / n.
    """
    counts = counts.detach().double().flatten()
    n = counts.numel()
    used = int((counts > 0).sum())
    total = float(counts.sum())
    if total > 0:
        p = counts[counts > 0] / total
        perplexity = math.exp(float(-(p * p.log()).sum()))
    else:
        perplexity = 0.0
    return {
        "codes_used": float(used),
        "dead_codes": float(n - used),
        "perplexity": perplexity,
        "usage_fraction": used / n if n else 0.0,
    }


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ResBlock(nn.Module):
    """x + (conv3 act conv3 act conv1)(x), channels unchanged."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1),
            act(),
            nn.Conv1d(channels, channels, 3, padding=1),
            act(),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T]
        return x + self.net(x)


class UpsampledConv(nn.Module):
    """Nearest-neighbour upsampling by ``stride``, then a same-length conv (DLAS's decoder
    layer when ``use_transposed_convs`` is false)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C', T * stride]
        return self.conv(F.interpolate(x, scale_factor=self.stride, mode="nearest"))


class Quantize(nn.Module):
    """Nearest-column vector quantiser whose codebook follows an exponential moving average
    of the vectors assigned to each code (VQ-VAE-2 style; no codebook gradient).

    Buffers: ``embed`` [dim, n] (column j is code j), ``cluster_size`` [n] (EMA of how many
    vectors chose each code), ``embed_avg`` [dim, n] (EMA of their sum). In train mode every
    call updates them and sets ``embed = embed_avg / smoothed cluster_size``.

    With ``dead_code_threshold`` > 0, each train call then re-seeds every code whose
    ``cluster_size`` is below it with a random vector of the batch (see DiscreteVAE).
    ``reseeded`` counts the codes re-seeded so far (a plain attribute, not saved).
    """

    def __init__(
        self,
        dim: int,
        n_embed: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
        self.dead_code_threshold = dead_code_threshold
        self.reseeded = 0
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., dim] -> (quantised x [..., dim] with straight-through gradient,
        codes [...] int64, commitment loss: mean squared distance of x to its codes)."""
        flat = x.reshape(-1, self.dim)  # [N, dim]
        # ||x - e||² expanded; the codes are the argmax of its negative (ties: DLAS's choice)
        dist = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.embed
            + self.embed.pow(2).sum(0, keepdim=True)
        )  # [N, n]
        codes = (-dist).max(1).indices  # [N]
        quantised = self.embed_code(codes).view_as(x)
        if self.training:
            self._ema_update(flat.detach(), codes)
            if self.dead_code_threshold > 0:
                self._reseed_dead_codes(flat.detach())
        commitment = (quantised.detach() - x).pow(2).mean()
        quantised = x + (quantised - x).detach()  # forward: the code vectors; backward: identity
        return quantised, codes.view(x.shape[:-1]), commitment

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.n_embed).type(flat.dtype)  # [N, n]
        counts = onehot.sum(0)  # [n]
        sums = flat.transpose(0, 1) @ onehot  # [dim, n]
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps unused codes from dividing by zero
        smoothed = (self.cluster_size + self.eps) / (total + self.n_embed * self.eps) * total
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(0))

    @torch.no_grad()
    def _reseed_dead_codes(self, flat: torch.Tensor) -> None:
        """Give every code with ``cluster_size`` < threshold a random vector of ``flat``
        [N, dim] (distinct ones while the batch has enough) and an EMA state of ``threshold``
        choices of it, so it is not re-seeded again at once. The indices come from torch's
        global CPU generator (seeded runs repeat; a resumed run restores it). Under
        torch.distributed rank 0's vectors are broadcast: the dead mask is already the same on
        every rank, since ``cluster_size`` was all-reduced."""
        dead = self.cluster_size < self.dead_code_threshold  # [n]
        n_dead = int(dead.sum())
        n = flat.shape[0]
        if n_dead == 0 or (n == 0 and not _distributed()):
            return
        if n == 0:  # an empty batch on this rank: it still joins the broadcast
            vectors = self.embed.new_zeros(n_dead, self.dim)
        else:
            # distinct vectors while the batch has enough, else draws with repeats
            picks = torch.randperm(n)[:n_dead] if n >= n_dead else torch.randint(0, n, (n_dead,))
            vectors = flat[picks.to(flat.device)].to(self.embed.dtype)  # [n_dead, dim]
        if _distributed():
            dist.broadcast(vectors, src=0)
        columns = vectors.transpose(0, 1)  # [dim, n_dead]
        self.embed[:, dead] = columns
        self.embed_avg[:, dead] = columns * self.dead_code_threshold
        self.cluster_size[dead] = self.dead_code_threshold
        self.reseeded += n_dead

    def embed_code(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> their vectors [..., dim]."""
        return F.embedding(codes, self.embed.transpose(0, 1))


@register_model("lucidrains_dvae")
class DiscreteVAE(nn.Module):
    """DLAS's DiscreteVAE (1-D): mel [B, channels, F] <-> codes [B, F'].

    Args:
        positional_dims: 1 (sequences); DLAS's 2-D image variant is not implemented.
        num_tokens: codebook size. codebook_dim: size of a code vector.
        num_layers: strided conv layers (each divides the frames by ``stride``); layer i has
            ``hidden_dim * 2**i`` channels.
        num_resnet_blocks: residual blocks after the encoder's and before the decoder's convs.
        hidden_dim: channels of the first layer. channels: mel bins of the input.
        stride, kernel_size: of the strided layers (padding ``(kernel_size - 1) // 2``).
        use_transposed_convs: decoder upsamples with ConvTranspose1d (true) or nearest
            upsampling + conv (false; Tortoise's DVAE).
        encoder_norm: GroupNorm(8) after each strided encoder layer.
        activation: "relu" or "silu".
        smooth_l1_loss: reconstruction loss smooth L1 instead of MSE.
        straight_through: accepted for DLAS YAMLs; DLAS's EMA quantiser always passes the
            gradient straight through, so it changes nothing.
        normalization: optional (means, stds) per channel applied to the input first.
        record_codes: count how often each code is chosen (``code_counts``, not saved).
        dead_code_threshold: re-seed dead codes (0: off, DLAS's behaviour). A code that no
            input picks gets no EMA update, so it never moves towards the data and stays
            unused (a known DVAE failure: a few codes take every frame). With a threshold > 0,
            each training step gives every code whose EMA count (``cluster_size``, vectors
            per batch choosing it) is below the threshold a random encoder output of the batch
            as its vector, as vector-quantize-pytorch's ``threshold_ema_dead_code`` does; 1 or
            2 is typical. ``codebook_usage()`` reports live and re-seeded codes.
        use_lr_quantizer: DLAS's lucidrains VectorQuantize; only false is supported.
        lr_quantizer_args: that quantiser's options; must stay empty.
    """

    def __init__(
        self,
        positional_dims: int = 2,
        num_tokens: PositiveInt = 512,
        codebook_dim: PositiveInt = 512,
        num_layers: NonNegativeInt = 3,
        num_resnet_blocks: NonNegativeInt = 0,
        hidden_dim: PositiveInt = 64,
        channels: PositiveInt = 3,
        stride: PositiveInt = 2,
        kernel_size: PositiveInt = 4,
        use_transposed_convs: bool = True,
        encoder_norm: bool = False,
        activation: Literal["relu", "silu"] = "relu",
        smooth_l1_loss: bool = False,
        straight_through: bool = False,
        normalization: list[list[float]] | None = None,
        record_codes: bool = False,
        use_lr_quantizer: bool = False,
        lr_quantizer_args: dict[str, Any] | None = None,
        dead_code_threshold: Annotated[float, Range(0)] = 0.0,
    ) -> None:
        super().__init__()
        if positional_dims != 1:
            raise ValueError(
                f"lucidrains_dvae: positional_dims must be 1 (mel sequences); the 2-D image "
                f"variant of DLAS is not implemented here (got {positional_dims})"
            )
        if use_lr_quantizer or lr_quantizer_args:
            raise ValueError(
                "lucidrains_dvae: use_lr_quantizer (lucidrains VectorQuantize) is not "
                "supported; set use_lr_quantizer: false and drop lr_quantizer_args (Tortoise's "
                "DVAE uses the EMA quantiser)"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"lucidrains_dvae: activation must be relu or silu, got {activation}")
        act = _ACTIVATIONS[activation]
        self.num_tokens, self.channels = num_tokens, channels
        self.straight_through = straight_through
        self.loss_fn = F.smooth_l1_loss if smooth_l1_loss else F.mse_loss
        pad = (kernel_size - 1) // 2

        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        if num_layers > 0:
            widths = [hidden_dim * 2**i for i in range(num_layers)]
            inner = widths[-1]
            enc_io = list(zip([channels, *widths[:-1]], widths))
            # the decoder mirrors the encoder; without res blocks it starts from the code dim
            dec_widths = [inner if num_resnet_blocks else codebook_dim, *reversed(widths)]
            for (e_in, e_out), d_in, d_out in zip(enc_io, dec_widths[:-1], dec_widths[1:]):
                enc.append(nn.Sequential(nn.Conv1d(e_in, e_out, kernel_size, stride, pad), act()))
                if encoder_norm:
                    enc.append(nn.GroupNorm(8, e_out))
                if use_transposed_convs:
                    up: nn.Module = nn.ConvTranspose1d(d_in, d_out, kernel_size, stride, pad)
                else:
                    up = UpsampledConv(d_in, d_out, kernel_size, stride, pad)
                dec.append(nn.Sequential(up, act()))
            dec_out = widths[0]
        else:
            inner = dec_out = hidden_dim
            enc.append(nn.Sequential(nn.Conv1d(channels, hidden_dim, 1), act()))
        enc += [ResBlock(inner, act) for _ in range(num_resnet_blocks)]
        dec = [ResBlock(inner, act) for _ in range(num_resnet_blocks)] + dec
        if num_resnet_blocks:
            dec.insert(0, nn.Conv1d(codebook_dim, inner, 1))
        enc.append(nn.Conv1d(inner, codebook_dim, 1))
        dec.append(nn.Conv1d(dec_out, channels, 1))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.codebook = Quantize(codebook_dim, num_tokens, dead_code_threshold=dead_code_threshold)

        self.normalization = normalization
        self.record_codes = record_codes
        self.code_counts = torch.zeros(num_tokens, dtype=torch.long)  # plain attribute: not saved

    def codebook_usage(self) -> dict[str, float]:
        """Codebook usage from the EMA state: ``live_codes`` (``cluster_size`` >= the
        re-seeding threshold, or 1e-3 when off), ``dead_codes``, ``perplexity`` of the EMA
        counts (see :func:`code_usage`) and ``reseeded_total`` (codes re-seeded since this
        object was built; not saved)."""
        threshold = self.codebook.dead_code_threshold
        floor = threshold if threshold > 0 else _LIVE_FLOOR
        live = int((self.codebook.cluster_size >= floor).sum())
        return {
            "live_codes": float(live),
            "dead_codes": float(self.num_tokens - live),
            "perplexity": code_usage(self.codebook.cluster_size)["perplexity"],
            "reseeded_total": float(self.codebook.reseeded),
        }

    def norm(self, mel: torch.Tensor) -> torch.Tensor:
        """Apply ``normalization`` (per-channel (x - mean) / std) if set."""
        if self.normalization is None:
            return mel
        means, stds = (torch.as_tensor(t).to(mel)[None, :, None] for t in self.normalization)
        return (mel - means) / stds

    def _encode(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised mel [B, C, F] -> (quantised [B, F', D], codes [B, F'], commitment)."""
        z = self.encoder(mel).permute(0, 2, 1)  # [B, F', D]
        quantised, codes, commitment = self.codebook(z)
        if self.record_codes:
            self.code_counts += torch.bincount(codes.flatten().cpu(), minlength=self.num_tokens)
        return quantised, codes, commitment

    @torch.no_grad()
    def get_codebook_indices(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, C, F] -> codes [B, ceil(F / stride**num_layers)] int64 (eval mode, the
        codebook untouched)."""
        was_training = self.training
        self.eval()
        try:
            return self._encode(self.norm(mel))[1]
        finally:
            self.train(was_training)

    def decode(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [B, F'] -> (mel [B, C, F' * stride**num_layers], the input of the last
        layer [B, hidden_dim, ...])."""
        x = self.codebook.embed_code(codes).permute(0, 2, 1)  # [B, D, F']
        for layer in self.decoder[:-1]:
            x = layer(x)
        return self.decoder[-1](x), x

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mel [B, C, F] -> (reconstruction loss [B, C, F] unreduced, commitment loss (scalar),
        reconstruction [B, C, F]). F must be a multiple of ``stride**num_layers``.

        Training decodes the straight-through quantised vectors (gradients reach the encoder)
        and updates the codebook; eval decodes the codes themselves (what inference gets)."""
        mel = self.norm(mel)
        quantised, codes, commitment = self._encode(mel)
        # training: straight-through vectors [B, D, F']; eval: the codes' own vectors
        x = quantised.permute(0, 2, 1)
        out = self.decoder(x) if self.training else self.decode(codes)[0]
        return self.loss_fn(mel, out, reduction="none"), commitment, out
