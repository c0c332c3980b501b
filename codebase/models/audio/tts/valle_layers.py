"""Building blocks of :mod:`models.audio.tts.valle`: rotary positions, a pre-norm transformer
trunk with an incremental key/value cache, and token sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [B or 1, 1, S, head_dim / 2]


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> Rope:
    """cos/sin of the rotary angles for integer ``positions`` [B, S] (or [1, S])."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )  # [hd / 2]
    angles = positions.float()[..., None] * inv_freq  # [B, S, hd / 2]
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) of ``x`` [B, H, S, hd] by the position's angles."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for incremental AR decoding.

    Items of a batch have prefixes of different lengths, so each item writes its next token at
    its own slot ``lengths[b]``; keys past an item's length are masked by the caller. Slots
    are allocated once (``capacity``) so a step never copies the cache.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * n_layers  # each [B, H, capacity, hd]
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.start = torch.zeros(0, dtype=torch.long)  # [B] slot of the first token written
        self.visible = 0  # slots the current call attends over (host int: no device sync)
        self.lengths = torch.zeros(0, dtype=torch.long)  # [B] tokens cached per item
        self.longest = 0  # max(lengths), kept on the host

    def begin(self, start: torch.Tensor, visible: int) -> None:
        """Tokens of the next trunk call go to slots ``start[b] + i``; attention sees
        ``visible`` slots."""
        if visible > self.capacity:
            raise ValueError(f"KV cache full: {visible} slots needed, capacity {self.capacity}")
        self.start, self.visible = start, visible

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, H, n, hd]; return the visible keys and values [B, H, K, hd]."""
        b, h, n, hd = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(b, h, self.capacity, hd)
            self.v[layer] = v.new_zeros(b, h, self.capacity, hd)
        rows = torch.arange(b, device=k.device)[:, None]  # [B, 1]
        slots = self.start[:, None] + torch.arange(n, device=k.device)  # [B, n]
        # advanced indices around a slice put the indexed dims first: [B, n, H, hd]
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer][:, :, : self.visible], self.v[layer][:, :, : self.visible]


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, index: int) -> None:
        super().__init__()
        self.n_heads, self.dropout, self.index = n_heads, dropout, index
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:  # q, k, v: [B, H, S, hd]
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.update(self.index, k, v)  # [B, H, K, hd]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None,
        )  # [B, H, S, hd]
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GELU)."""

    def __init__(
        self, d_model: int, n_heads: int, ff_mult: int, dropout: float, index: int
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, index)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, ff_mult * d_model, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * d_model, d_model, bias=False),
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope, mask, causal, cache))
        return x + self.drop(self.mlp(self.ln2(x)))


class Trunk(nn.Module):
    """A stack of blocks and a final LayerNorm. With ``checkpointing`` (training only), each
    block's activations are recomputed in the backward pass instead of stored."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ff_mult: int,
        dropout: float,
        checkpointing: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, ff_mult, dropout, i) for i in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.checkpointing = checkpointing

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, mask, causal, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, causal, cache)
        return self.ln_f(x)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits [B, V] outside the top-k and outside the nucleus (smallest set with
    probability >= top_p) to -inf; the most likely token always survives."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty on tokens already generated (``seen`` [B, V] bool): a
    positive logit is divided by ``penalty``, a negative one multiplied."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] -> [B] long; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    if generator is not None and generator.device.type != probs.device.type:
        # a CPU generator driving a GPU model: draw on the generator's device, still seeded
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(
            probs.device
        )
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
