"""A self-contained GPT-2 decoder with Hugging Face's parameter names and weight layout.

Tortoise's ``autoregressive.pth`` and DLAS checkpoints hold a ``transformers.GPT2Model`` under
``gpt.``; this module has the same keys (``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` ...,
``ln_f``) and the same ``Conv1D`` layout (weights stored [in, out], ``y = x @ W + b``), so
those files load as they are. Like the Tortoise/DLAS use of GPT-2 it has no token or position
tables (the caller adds its own embeddings) and takes ``inputs_embeds`` only.

Pre-LN blocks, tanh GELU (``gelu_new``), LayerNorm eps 1e-5, dropout on the input, on the
attention weights and on both residual branches. Attention is
``scaled_dot_product_attention``; an optional key/value cache and an optional key padding
mask serve (batched) generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Per layer: (keys, values), each [B, H, S_past, Dh].
PastKV = list[tuple[torch.Tensor, torch.Tensor]]


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection: a linear layer whose weight is stored [in, out]."""

    def __init__(self, n_in: int, n_out: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(0.0, init_std))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.weight.shape[1]
        )


class Attention(nn.Module):
    """Causal multi-head self-attention (``attn.c_attn`` = fused q, k, v; ``attn.c_proj``)."""

    def __init__(self, dim: int, heads: int, dropout: float, proj_std: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim, init_std=proj_std)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        # [B, T, D] -> [B, H, T, Dh]
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, H, S_past + T, Dh]
            v = torch.cat([past[1], v], dim=2)
        s = k.shape[2]
        p = self.dropout if self.training else 0.0
        if key_mask is not None:  # causal (after the cache) and only real keys: [B, 1, T, S]
            causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
            mask = causal & key_mask[:, None, None, :].to(torch.bool)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif s == t:  # no cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif t == 1:  # one new token sees everything before it
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # several new tokens after a cache: causal with an offset
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    """``mlp.c_fc`` -> tanh GELU -> ``mlp.c_proj`` -> dropout."""

    def __init__(self, dim: int, inner: int, dropout: float, proj_std: float) -> None:
        super().__init__()
        self.c_fc = Conv1D(dim, inner)
        self.c_proj = Conv1D(inner, dim, init_std=proj_std)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: h + attn(ln_1 h), then h + mlp(ln_2 h)."""

    def __init__(self, dim: int, heads: int, inner: int, dropout: float, eps: float, proj_std):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout, proj_std)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, inner, dropout, proj_std)

    def forward(
        self,
        h: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, present = self.attn(self.ln_1(h), past, key_mask)
        h = h + a
        return h + self.mlp(self.ln_2(h)), present


class GPT2(nn.Module):
    """GPT-2 trunk over input embeddings: [B, T, D] -> last hidden states [B, T, D].

    Args:
        dim, layers, heads: width, depth and attention heads (``dim % heads == 0``).
        n_positions: the context length the caller's position tables allow; kept for the
            legacy causal-mask buffers older transformers saved (see ``legacy_buffers``).
        inner: MLP width (GPT-2's default ``4 * dim`` when None).
        dropout: embedding, attention and residual dropout (GPT-2's 0.1).
        eps: LayerNorm epsilon (GPT-2's 1e-5).
        checkpointing: recompute each block in the backward pass when training.
    """

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        n_positions: int,
        inner: int | None = None,
        dropout: float = 0.1,
        eps: float = 1e-5,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"GPT-2 width {dim} is not divisible by its {heads} heads")
        self.n_positions = n_positions
        self.checkpointing = checkpointing
        self.drop = nn.Dropout(dropout)
        # GPT-2 scales the init of the projections into the residual stream by depth
        proj_std = 0.02 / (2 * layers) ** 0.5
        self.h = nn.ModuleList(
            Block(dim, heads, inner or 4 * dim, dropout, eps, proj_std) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        past: PastKV | None = None,
        use_cache: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PastKV | None]:
        """Returns (ln_f of the last block's output [B, T, D], each layer's keys/values when
        ``use_cache``). With ``past``, ``inputs_embeds`` are the tokens that follow it.

        ``key_mask`` (bool [B, S_past + T], True = a real token) hides padding from every
        query, on top of the causal mask; each query must still see at least one real key
        (else its row is NaN). None keeps the plain causal fast paths (training)."""
        h = self.drop(inputs_embeds)
        presents: PastKV = []
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            layer_past = past[i] if past is not None else None
            if recompute and layer_past is None:
                h, kv = checkpoint(block, h, None, key_mask, use_reentrant=False)
            else:
                h, kv = block(h, layer_past, key_mask)
            if use_cache:
                presents.append(kv)
        return self.ln_f(h), (presents if use_cache else None)

    def legacy_buffers(self, prefix: str = "") -> dict[str, dict[str, torch.Tensor]]:
        """The causal-mask buffers transformers < 4.31 saved in every GPT-2 state dict, per
        block prefix: ``{"h.{i}.attn.": {"bias": bool [1, 1, P, P], "masked_bias": -1e4}}``."""
        mask = torch.ones(self.n_positions, self.n_positions, dtype=torch.bool).tril()
        return {
            f"{prefix}h.{i}.attn.": {
                "bias": mask.clone()[None, None],
                "masked_bias": torch.tensor(-1e4),
            }
            for i in range(len(self.h))
        }
