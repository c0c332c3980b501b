"""VALL-E: an autoregressive + non-autoregressive transformer over neural-codec tokens.

Each item is one sequence of its real tokens, packed contiguously (padding only at the end):

    [ phonemes (bos..eos) | prompt frames (sum of all levels) | start | target frames ]

* AR (causal): the target frames are level-0 codes; position ``start + i`` predicts frame i,
  and the last position predicts the stop token (index ``codebook_size``).
* NAR (bidirectional): the target frames are the sum of levels ``0..L-1``; each frame
  predicts its level ``L`` (1 <= L < n_levels, sampled per item in training). The task
  embedding (0 = AR, L = NAR for level L) is added to every token, so one shared trunk
  knows which job it is doing, and each level has its own output head.

Because each item's tokens are contiguous from position 0, an item's positions, attention and
loss are the same whether it is alone or padded in a batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models import register_model
from models.audio.tts.valle_layers import KVCache, Trunk, penalize_repeats, rope_angles, sample
from utils.schema import Fraction, PositiveInt, Runtime

Segment = tuple[torch.Tensor, torch.Tensor]  # (embeddings [B, S_i, D], lengths [B])


def pack(segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Concatenate each item's real tokens of every segment, then pad at the end.

    Returns packed [B, S, D], total lengths [B], and each segment's start per item [B].
    """
    b, d = segments[0][0].shape[0], segments[0][0].shape[2]
    starts, total = [], torch.zeros_like(segments[0][1])
    for _, n in segments:
        starts.append(total)
        total = total + n
    s = int(total.max())
    j = torch.arange(s, device=total.device)[None]  # [1, S]
    src = torch.zeros(b, s, dtype=torch.long, device=total.device)  # index into the concat
    width = 0
    for (emb, n), start in zip(segments, starts):
        inside = (j >= start[:, None]) & (j < (start + n)[:, None])  # [B, S]
        src = torch.where(inside, width + j - start[:, None], src)
        width += emb.shape[1]
    cat = torch.cat([emb for emb, _ in segments], dim=1)  # [B, sum S_i, D]
    return cat.gather(1, src[..., None].expand(b, s, d)), total, starts


def sinusoids(index: torch.Tensor, d: int) -> torch.Tensor:
    """Transformer sinusoidal embeddings of integer positions [...] -> [..., d] (float32)."""
    freq = torch.exp(
        torch.arange(0, d, 2, device=index.device, dtype=torch.float32) * (-math.log(10000.0) / d)
    )  # [d / 2]
    angles = index.float()[..., None] * freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def take(h: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """h[b, start[b] : start[b] + n] for every item: [B, S, D] -> [B, n, D] (clamped at S)."""
    idx = (start[:, None] + torch.arange(n, device=h.device)).clamp(max=h.shape[1] - 1)
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[2]))


# The reference size of the benchmarks and the full recipe: 168M parameters with shared weights.
REFERENCE_CONFIG = dict(
    n_phonemes=256, codebook_size=1024, n_levels=8, d_model=1024, n_layers=12, n_heads=16
)


@register_model("valle")
class VALLE(nn.Module):
    """VALL-E over ``n_levels`` residual codebooks of ``codebook_size`` codes.

    Args:
        n_phonemes: phoneme vocabulary size (ids include pad 0, bos 1, eos 2).
        codebook_size: codes per level; the AR adds one stop token at this index.
        n_levels: codebook levels modelled (level 0 by the AR, the rest by the NAR); data
            with more levels uses the first ``n_levels``.
        d_model, n_layers, n_heads, ff_mult: transformer size (FFN width = ff_mult * d_model).
        dropout: on embeddings, attention weights and residual branches.
        shared_weights: one trunk for AR and NAR (told apart by the task embedding); False
            gives each its own trunk (embeddings and heads are shared either way).
        positions: "rope" (rotary on queries/keys, no length limit) or "learned" (an
            absolute table of ``max_positions`` rows, added to the input).
        max_positions: longest item (phonemes + prompt + 1 + target) with learned positions.
        segment_positions: also add sinusoidal positions that restart at 0 in each segment
            (phonemes, prompt, start + target), scaled by a learned factor per segment, to
            the input (VALL-E's and TransformerTTS's scheme). It gives every target frame
            its distance from the first frame and every phoneme its index in the text, which
            makes the text-to-audio alignment much faster to learn on small data.
        ar_input_noise: while training, replace this fraction of the AR's input codes (the
            previous frames it is conditioned on, not its targets) with random codes, so that
            copying the previous frames predicts less and the text must be used (0: off).
        checkpointing: recompute each block in the backward pass (training only) to save
            activation memory; set by the trainer from the experiment's top-level
            ``checkpointing_enabled``.
    """

    # LoRA's default targets (models/lora.py): every trunk's attention and MLP projections
    lora_targets = ("*.attn.*", "*.mlp.*")

    def __init__(
        self,
        n_phonemes: PositiveInt = 256,
        codebook_size: PositiveInt = 1024,
        n_levels: PositiveInt = 8,
        d_model: PositiveInt = 512,
        n_layers: PositiveInt = 12,
        n_heads: PositiveInt = 8,
        ff_mult: PositiveInt = 4,
        dropout: Fraction = 0.1,
        shared_weights: bool = True,
        positions: Literal["rope", "learned"] = "rope",
        max_positions: PositiveInt = 4096,
        segment_positions: bool = False,
        ar_input_noise: Fraction = 0.0,
        checkpointing: Runtime[bool] = False,
    ) -> None:
        super().__init__()
        if n_levels < 2:
            raise ValueError(
                f"valle: n_levels must be >= 2 (level 0 for the AR, the rest for "
                f"the NAR), got {n_levels}"
            )
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"valle: d_model ({d_model}) must split into n_heads ({n_heads}) "
                f"heads of even size (rotary positions rotate pairs)"
            )
        if not 0.0 <= ar_input_noise < 1.0:
            raise ValueError(f"valle: ar_input_noise must be in [0, 1), got {ar_input_noise}")
        self.ar_input_noise = ar_input_noise
        if positions not in ("rope", "learned"):
            raise ValueError(f"valle: positions must be 'rope' or 'learned', got {positions!r}")
        self.n_phonemes, self.codebook_size, self.n_levels = n_phonemes, codebook_size, n_levels
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.positions, self.max_positions = positions, max_positions
        self.shared_weights = shared_weights

        self.phoneme_emb = nn.Embedding(n_phonemes, d_model)
        # one table per level: code 5 of level 0 and code 5 of level 3 are unrelated vectors
        self.code_embs = nn.ModuleList(
            nn.Embedding(codebook_size, d_model) for _ in range(n_levels)
        )
        self.start = nn.Parameter(torch.zeros(d_model))  # marks where the target begins
        self.task_emb = nn.Embedding(n_levels, d_model)  # 0 = AR; L = NAR predicting level L
        self.pos_emb = nn.Embedding(max_positions, d_model) if positions == "learned" else None
        # One scale per segment (phonemes, prompt, target), as TransformerTTS's alpha. The
        # sinusoids' RMS is 1/sqrt(2): this starts them at the embeddings' scale (std 0.02).
        self.segment_scale = (
            nn.Parameter(torch.full((3,), 0.02 * math.sqrt(2))) if segment_positions else None
        )
        self.drop = nn.Dropout(dropout)
        self.trunks = nn.ModuleList(
            Trunk(d_model, n_layers, n_heads, ff_mult, dropout, checkpointing)
            for _ in range(1 if shared_weights else 2)
        )
        self.ar_head = nn.Linear(d_model, codebook_size + 1)
        # a head per NAR level, stacked so a batch with mixed levels is one bmm
        self.nar_weight = nn.Parameter(torch.empty(n_levels - 1, codebook_size, d_model))
        self.nar_bias = nn.Parameter(torch.zeros(n_levels - 1, codebook_size))
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled down by
        sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.nar_weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.n_layers))

    # ---- sequences ------------------------------------------------------------------------

    def _trunk(self, task: int) -> Trunk:
        return self.trunks[0 if self.shared_weights or task == 0 else 1]

    def _embed_codes(self, codes: torch.Tensor, upto: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of level embeddings of codes [B, levels, T] -> [B, T, D]: all ``n_levels``, or
        levels below ``upto[b]`` for item b."""
        x = 0
        for level, emb in enumerate(self.code_embs):
            e = emb(codes[:, level])  # [B, T, D]
            x = x + (e if upto is None else e * (level < upto)[:, None, None].to(e.dtype))
        return x

    def _sequence(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        target: torch.Tensor,
        target_lengths: torch.Tensor,
        task: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed input [B, S, D] for the target segment ``target`` [B, T, D] (start included),
        with lengths [B] and where the target segment starts [B]."""
        segments = [phoneme_lengths, prompt_lengths, target_lengths]
        x, lengths, starts = pack(
            [
                (self.phoneme_emb(phonemes), phoneme_lengths),
                (self._embed_codes(prompt), prompt_lengths),
                (target, target_lengths),
            ]
        )
        x = x + self.task_emb(task)[:, None]
        if self.segment_scale is not None:
            x = x + self._segment_positions(starts, segments, x.shape[1]).to(x.dtype)
        if self.pos_emb is not None:
            self._check_positions(x.shape[1])
            x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        return self.drop(x), lengths, starts[2]

    def _segment_positions(
        self, starts: list[torch.Tensor], lengths: list[torch.Tensor], s: int
    ) -> torch.Tensor:
        """[B, S, D] scaled sinusoids of each packed token's index within its segment."""
        j = torch.arange(s, device=starts[0].device)[None]  # [1, S]
        index = torch.zeros(starts[0].shape[0], s, dtype=torch.long, device=j.device)
        segment = torch.zeros_like(index)
        for k, (start, n) in enumerate(zip(starts, lengths)):
            inside = (j >= start[:, None]) & (j < (start + n)[:, None])
            index = torch.where(inside, j - start[:, None], index)
            segment = torch.where(inside, k, segment)
        return self.segment_scale[segment][..., None] * sinusoids(index, self.d_model)

    def _check_positions(self, n: int) -> None:
        if self.pos_emb is not None and n > self.max_positions:
            raise ValueError(
                f"valle: an item needs {n} positions (phonemes + prompt frames + 1 + target "
                f"frames) but max_positions is {self.max_positions} with positions='learned'; "
                f"raise max_positions in the network kwargs, use positions='rope', or use "
                f"shorter items/prompts (max_frames)"
            )

    def _run(self, task: int, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The trunk over packed x [B, S, D]: causal for the AR, keys masked at padding for
        the NAR. Padding sits after each item's tokens, so causal rows never see it."""
        s = x.shape[1]
        rope = (
            rope_angles(torch.arange(s, device=x.device)[None], self.d_model // self.n_heads)
            if self.pos_emb is None
            else None
        )
        mask = (
            None
            if task == 0
            else (torch.arange(s, device=x.device)[None] < lengths[:, None])[:, None, None]
        )  # [B, 1, 1, S]
        return self._trunk(task)(x, rope, mask, causal=task == 0)

    def _check_ids(
        self, phonemes: torch.Tensor, prompt: torch.Tensor, codes: torch.Tensor | None = None
    ) -> None:
        """Clear errors for out-of-range ids (an embedding would fail with an opaque one)."""
        for name, t in (("prompt", prompt), ("codes", codes)):
            if t is not None and (t.dim() != 3 or t.shape[1] < self.n_levels):
                raise ValueError(
                    f"valle: {name} must be [B, levels >= {self.n_levels}, frames] "
                    f"(n_levels={self.n_levels}), got {tuple(t.shape)}"
                )
        tops = [phonemes.max() if phonemes.numel() else phonemes.new_zeros(())]
        tops += [
            t[:, : self.n_levels].max() for t in (prompt, codes) if t is not None and t.numel()
        ]
        top = torch.stack(tops).tolist()  # one device sync for all checks
        if top[0] >= self.n_phonemes:
            raise ValueError(
                f"valle: phoneme id {top[0]} >= n_phonemes {self.n_phonemes}; "
                f"raise n_phonemes to the vocabulary size"
            )
        if max(top[1:], default=0) >= self.codebook_size:
            raise ValueError(
                f"valle: code {max(top[1:])} >= codebook_size {self.codebook_size}; "
                f"set codebook_size to the codec's"
            )

    # ---- AR and NAR passes ----------------------------------------------------------------

    def ar_logits(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        codes0: torch.Tensor,
        code_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced AR logits [B, T + 1, codebook_size + 1] for level-0 codes0 [B, T]:
        position i predicts frame i, position code_lengths[b] the stop (later ones: padding)."""
        b = codes0.shape[0]
        if self.training and self.ar_input_noise > 0:
            noisy = torch.rand(codes0.shape, device=codes0.device) < self.ar_input_noise
            codes0 = torch.where(noisy, torch.randint_like(codes0, self.codebook_size), codes0)
        target = torch.cat([self.start.expand(b, 1, -1), self.code_embs[0](codes0)], dim=1)
        task = torch.zeros(b, dtype=torch.long, device=codes0.device)
        x, lengths, start = self._sequence(
            phonemes, phoneme_lengths, prompt, prompt_lengths, target, code_lengths + 1, task
        )
        h = take(self._run(0, x, lengths), start, codes0.shape[1] + 1)  # [B, T + 1, D]
        return self.ar_head(h)

    def nar_logits(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        codes: torch.Tensor,
        code_lengths: torch.Tensor,
        level: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [B, T, codebook_size] of level ``level[b]`` (>= 1) of every target frame,
        given levels below it of codes [B, levels, T]."""
        b, t = codes.shape[0], codes.shape[2]
        target = torch.cat([self.start.expand(b, 1, -1), self._embed_codes(codes, level)], 1)
        x, lengths, start = self._sequence(
            phonemes, phoneme_lengths, prompt, prompt_lengths, target, code_lengths + 1, level
        )
        h = take(self._run(1, x, lengths), start + 1, t)  # [B, T, D], past the start token
        weight, bias = self.nar_weight[level - 1], self.nar_bias[level - 1]  # [B, K, D], [B, K]
        return torch.baddbmm(bias[:, None], h, weight.transpose(1, 2))

    def item_losses(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        codes: torch.Tensor,
        code_lengths: torch.Tensor,
        nar_level: int | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-item sums [B]: ``{ar,nar}_{loss,correct,count}`` (cross-entropy, top-1 hits,
        target tokens). ``nar_level`` fixes the NAR level (default: uniform per item)."""
        self._check_ids(phonemes, prompt, codes)
        b, t, dev = codes.shape[0], codes.shape[2], codes.device
        k = torch.arange(t + 1, device=dev)[None]  # [1, T + 1]
        ar_target = F.pad(codes[:, 0], (0, 1))  # [B, T + 1]
        ar_target = ar_target.masked_fill(k == code_lengths[:, None], self.codebook_size)
        out = self._scores(
            "ar",
            self.ar_logits(
                phonemes, phoneme_lengths, prompt, prompt_lengths, codes[:, 0], code_lengths
            ),
            ar_target,
            k <= code_lengths[:, None],
        )
        if nar_level is None:
            level = torch.randint(1, self.n_levels, (b,), device=dev)
        else:
            level = torch.as_tensor(nar_level, device=dev).expand(b)
            if not bool(((level >= 1) & (level < self.n_levels)).all()):
                raise ValueError(f"valle: nar_level must be in 1..{self.n_levels - 1}")
        nar_target = codes[torch.arange(b, device=dev), level]  # [B, T]
        logits = self.nar_logits(
            phonemes, phoneme_lengths, prompt, prompt_lengths, codes, code_lengths, level
        )
        out.update(self._scores("nar", logits, nar_target, k[:, :t] < code_lengths[:, None]))
        return out

    @staticmethod
    def _scores(
        name: str, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none")
        ce = ce.view_as(target) * valid
        hits = (logits.detach().argmax(-1) == target) & valid
        return {
            f"{name}_loss": ce.sum(1),
            f"{name}_correct": hits.sum(1),
            f"{name}_count": valid.sum(1),
        }

    def forward(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        codes: torch.Tensor,
        code_lengths: torch.Tensor,
        _nar_level: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token-mean losses ``loss_ar``, ``loss_nar`` and top-1 accuracies ``acc_ar``,
        ``acc_nar`` (no grad) over the batch's target tokens (AR: frames + stop)."""
        s = self.item_losses(
            phonemes, phoneme_lengths, prompt, prompt_lengths, codes, code_lengths, _nar_level
        )
        out = {}
        for name in ("ar", "nar"):
            count = s[f"{name}_count"].sum().clamp(min=1)
            out[f"loss_{name}"] = s[f"{name}_loss"].sum() / count
            out[f"acc_{name}"] = (s[f"{name}_correct"].sum() / count).float().detach()
        return out

    # ---- generation -----------------------------------------------------------------------

    def ar_prefill(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        capacity: int,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run [phonemes | prompt | start] once, caching keys/values with room for
        ``capacity`` more tokens; returns the logits of frame 0 [B, codebook_size + 1]."""
        b, dev = phonemes.shape[0], phonemes.device
        task = torch.zeros(b, dtype=torch.long, device=dev)
        x, lengths, target_start = self._sequence(
            phonemes,
            phoneme_lengths,
            prompt,
            prompt_lengths,
            self.start.expand(b, 1, -1),
            torch.ones_like(task),
            task,
        )
        s = x.shape[1]
        cache = KVCache(self.n_layers, s + capacity)
        cache.target_start = target_start  # [B] where each item's start token sits
        cache.begin(torch.zeros_like(task), s)
        rope = (
            rope_angles(torch.arange(s, device=dev)[None], self.d_model // self.n_heads)
            if self.pos_emb is None
            else None
        )
        h = self._trunk(0)(x, rope, None, causal=True, cache=cache)  # [B, S, D]
        cache.lengths, cache.longest = lengths, s  # next slot per item; the largest, on host
        return self.ar_head(h[torch.arange(b, device=dev), lengths - 1]), cache

    def ar_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one level-0 token per item [B]; returns the next logits [B, codebook_size + 1].
        Each item's token takes its own next position (its prefix length + steps so far)."""
        pos = cache.lengths  # [B]
        x = self.code_embs[0](tokens)[:, None] + self.task_emb.weight[0]  # [B, 1, D]
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)[:, None]
        if self.segment_scale is not None:  # index within the target segment (start = 0)
            x = x + (self.segment_scale[2] * sinusoids(pos - cache.target_start, self.d_model))[
                :, None
            ].to(x.dtype)
        cache.begin(pos, cache.longest + 1)
        keys = torch.arange(cache.visible, device=pos.device)[None]
        mask = (keys <= pos[:, None])[:, None, None]  # [B, 1, 1, K]: own tokens only
        rope = (
            rope_angles(pos[:, None], self.d_model // self.n_heads)
            if self.pos_emb is None
            else None
        )
        h = self._trunk(0)(x, rope, mask, causal=False, cache=cache)  # [B, 1, D]
        cache.lengths, cache.longest = pos + 1, cache.longest + 1
        return self.ar_head(h[:, 0])

    @torch.no_grad()
    def generate(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        *,
        max_frames: int = 1000,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        nar_temperature: float = 0.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [B, n_levels, F] (long, 0 past each item's length) and lengths [B].

        The AR samples level 0 until each item's stop token (or ``max_frames``); the NAR then
        fills levels 1.. in one parallel pass each. Runs in eval mode (no dropout).
        """
        if (
            max_frames < 1
            or temperature < 0
            or top_k < 0
            or not 0 < top_p <= 1
            or repetition_penalty <= 0
            or nar_temperature < 0
        ):
            raise ValueError(
                "valle.generate: need max_frames >= 1, temperature >= 0, "
                "top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0, "
                "nar_temperature >= 0"
            )
        self._check_ids(phonemes, prompt)
        if self.pos_emb is not None:  # the last frame is sampled, never fed back: p + q + 1 +
            # (max_frames - 1) positions at most
            self._check_positions(int((phoneme_lengths + prompt_lengths).max()) + max_frames)
        was_training = self.training
        self.eval()
        try:
            args = (phonemes, phoneme_lengths, prompt, prompt_lengths)
            codes0, lengths = self._generate_ar(
                *args,
                max_frames,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                use_cache,
                generator,
            )
            codes = torch.zeros(
                codes0.shape[0],
                self.n_levels,
                codes0.shape[1],
                dtype=torch.long,
                device=codes0.device,
            )
            codes[:, 0] = codes0
            real = torch.arange(codes.shape[2], device=codes.device)[None] < lengths[:, None]
            for level in range(1, self.n_levels if codes.shape[2] else 1):  # none if empty
                at = torch.full_like(lengths, level)
                logits = self.nar_logits(*args, codes, lengths, at)  # [B, F, K]
                pred = sample(logits.flatten(0, 1), nar_temperature, generator=generator)
                codes[:, level] = pred.view_as(codes0) * real
        finally:
            self.train(was_training)
        return codes, lengths

    def _generate_ar(
        self,
        phonemes: torch.Tensor,
        phoneme_lengths: torch.Tensor,
        prompt: torch.Tensor,
        prompt_lengths: torch.Tensor,
        max_frames: int,
        temperature: float,
        top_k: int,
        top_p: float,
        repetition_penalty: float,
        use_cache: bool,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Level-0 codes [B, F] (0 after each item's stop) and lengths [B]."""
        args = (phonemes, phoneme_lengths, prompt, prompt_lengths)
        b, dev, stop = phonemes.shape[0], phonemes.device, self.codebook_size
        out = torch.zeros(b, max_frames, dtype=torch.long, device=dev)
        lengths = torch.full((b,), max_frames, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        seen = torch.zeros(b, stop + 1, dtype=torch.bool, device=dev)  # for the penalty
        rows = torch.arange(b, device=dev)
        if use_cache:
            logits, cache = self.ar_prefill(*args, capacity=max_frames)
        else:
            logits = self.ar_logits(*args, out[:, :0], torch.zeros_like(lengths))[:, -1]
        for t in range(max_frames):
            logits = penalize_repeats(logits, seen, repetition_penalty)
            token = sample(logits, temperature, top_k, top_p, generator)  # [B]
            lengths = torch.where((token == stop) & ~done, t, lengths)
            done = done | (token == stop)
            token = token.masked_fill(done, 0)  # finished items keep padding
            out[:, t] = token
            seen[rows, token] |= ~done
            if t + 1 == max_frames or bool(done.all()):
                break
            if use_cache:
                logits = self.ar_step(token, cache)
            else:  # the whole sequence again: the reference the cache must match
                frames = torch.full_like(lengths, t + 1)
                logits = self.ar_logits(*args, out[:, : t + 1], frames)[:, -1]
        return out[:, : int(lengths.max())], lengths
