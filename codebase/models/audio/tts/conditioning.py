"""Tortoise's conditioning encoder: a voice clip's mel spectrogram -> one vector.

``init`` (1x1 conv, mel bins -> dim), then attention blocks over time; the vector is the
channel column at frame 0. Parameter names match Tortoise/DLAS (``init``, ``attn.{i}.norm``,
``attn.{i}.qkv``, ``attn.{i}.proj_out``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def norm_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: 32 (8 up to 16 channels, 16 up to 64), halved until
    they divide the channels (Tortoise's rule)."""
    groups = 8 if channels <= 16 else 16 if channels <= 64 else 32
    while channels % groups:
        groups //= 2
    if groups <= 2:
        raise ValueError(f"conditioning encoder width {channels} has too few norm groups")
    return groups


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class AttentionBlock(nn.Module):
    """Self-attention over frames with a residual.

    ``raw_residual`` True: x + proj_out(attn(norm x)) (Tortoise, what ``autoregressive.pth``
    was trained with); False: norm(x) + proj_out(attn(norm x)) (DLAS since June 2022).
    The qkv channels are laid out per head (q, k, v of head 0, then head 1 ...), as in
    Tortoise's ``QKVAttentionLegacy``.
    """

    def __init__(self, dim: int, heads: int, raw_residual: bool, checkpointing: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"conditioning encoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.raw_residual = raw_residual
        self.checkpointing = checkpointing
        self.norm = GroupNorm32(norm_groups(dim), dim)
        self.qkv = nn.Conv1d(dim, 3 * dim, 1)
        self.proj_out = nn.Conv1d(dim, dim, 1)
        nn.init.zeros_(self.proj_out.weight)  # each block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape  # [B, C, T]
        n = self.norm(x)
        qkv = self.qkv(n).reshape(b, self.heads, 3 * (c // self.heads), t)
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)  # each [B, H, T, C/H]
        # softmax in float32 like the original (qkv may be half precision under autocast)
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).type(v.dtype)
        h = self.proj_out(y.transpose(2, 3).reshape(b, c, t))
        return (x if self.raw_residual else n) + h


class ConditioningEncoder(nn.Module):
    """Mel [B, n_mels, T] -> [B, dim] (the encoder output at frame 0)."""

    def __init__(
        self,
        n_mels: int,
        dim: int,
        heads: int,
        blocks: int = 6,
        raw_residual: bool = True,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.init = nn.Conv1d(n_mels, dim, 1)
        self.attn = nn.Sequential(
            *(AttentionBlock(dim, heads, raw_residual, checkpointing) for _ in range(blocks))
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.attn(self.init(mel))[:, :, 0]
