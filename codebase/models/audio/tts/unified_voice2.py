"""Tortoise's autoregressive GPT (DLAS ``unified_voice2``): text + voice -> DVAE mel codes.

One GPT-2 reads, per item,

    [ conditioning (N tokens) | start_text, text, stop_text | start_mel, codes, stop_mel ]

with learned positions that restart at 0 in the text and in the mel segment. Training
scores text logits against the next text token and mel logits against the next code
(DLAS rules, ``forward``); ``generate`` continues the mel segment token by token.

Parameter names and shapes are those of Tortoise's ``UnifiedVoice`` (= DLAS ``unified_voice2``),
so ``autoregressive.pth`` loads strictly once ``adapt_checkpoint`` has dropped the causal-mask
buffers old transformers versions saved.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from models import register_model
from models.audio.tts.conditioning import ConditioningEncoder
from models.audio.tts.gpt2 import GPT2, PastKV
from models.audio.tts.valle_layers import sample
from utils.schema import NonNegativeInt, PositiveInt, Runtime

# transformers < 4.31 saved GPT-2's causal mask as buffers: gpt.h.{i}.attn.bias / .masked_bias
_LEGACY_KEY = re.compile(r"^gpt\.h\.\d+\.attn\.(bias|masked_bias)$")


class LearnedPositions(nn.Module):
    """Absolute positions 0..L-1 of one segment (``<name>.emb.weight``)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int, start: int = 0) -> torch.Tensor:
        return self.emb(torch.arange(start, start + length, device=self.emb.weight.device))


@register_model("unified_voice2")
class UnifiedVoice2(nn.Module):
    """Tortoise / DLAS GPT TTS over 8192 DVAE codes.

    Args:
        layers, model_dim, heads: GPT-2 size (seed: 30, 1024, 16).
        max_text_tokens, max_mel_tokens: longest text / code sequence (tables get +2 rows for
            start and stop, and the mel table + ``max_conditioning_inputs`` more, as DLAS).
        max_conditioning_inputs: conditioning clips per item the context is sized for.
        mel_length_compression: audio samples per code (wav_lengths // this = codes).
        number_text_tokens: text table rows (256: BPE ids 0..254 and the start token 255).
        start_text_token: None means ``number_text_tokens - 1``; stop_text_token: 0.
        number_mel_codes, start_mel_token, stop_mel_token: 8194 rows, 8192, 8193.
        train_solo_embeddings: adds DLAS's ``text/mel_solo_embedding`` parameters (only used
            by DLAS's text-only / speech-only forwards, which this class does not have).
        use_mel_codes_as_input: must be True (codes are embedded; DLAS's raw-mel encoder
            input is not implemented).
        checkpointing: DLAS's option: recompute each GPT-2 block in the backward pass.
        average_conditioning_embeddings: one token, the mean of the clips' encodings
            (DLAS default False: one token per clip, see the README on the text shift).
        freeze_everything_but_position_embeddings: train only the two position tables.
        types: must be 1 (Tortoise's multi-type text tables are not implemented).
        tortoise_compat: conditioning-encoder residual of Tortoise (x + attn, what
            ``autoregressive.pth`` was trained with); False: DLAS's norm(x) + attn.
        checkpointing_enabled: the experiment's ``checkpointing_enabled`` (set by the
            trainer): recompute the GPT-2 and conditioning-encoder blocks.
    """

    # LoRA's default targets (models/lora.py): the GPT-2 blocks' attention and MLP projections
    # (c_attn, c_proj, c_fc); the conditioning encoder's 1x1 convolutions are not adapted
    lora_targets = ("gpt.h.*.attn.*", "gpt.h.*.mlp.*")

    def __init__(
        self,
        layers: PositiveInt = 8,
        model_dim: PositiveInt = 512,
        heads: PositiveInt = 8,
        max_text_tokens: PositiveInt = 120,
        max_mel_tokens: PositiveInt = 250,
        max_conditioning_inputs: PositiveInt = 1,
        mel_length_compression: PositiveInt = 1024,
        number_text_tokens: PositiveInt = 256,
        start_text_token: NonNegativeInt | None = None,
        stop_text_token: NonNegativeInt = 0,
        number_mel_codes: PositiveInt = 8194,
        start_mel_token: NonNegativeInt = 8192,
        stop_mel_token: NonNegativeInt = 8193,
        train_solo_embeddings: bool = False,
        use_mel_codes_as_input: bool = True,
        checkpointing: bool = False,
        average_conditioning_embeddings: bool = False,
        freeze_everything_but_position_embeddings: bool = False,
        types: PositiveInt = 1,
        tortoise_compat: bool = True,
        checkpointing_enabled: Runtime[bool] = False,
    ) -> None:
        super().__init__()
        if start_text_token is None:
            start_text_token = number_text_tokens - 1
        _check_options(
            model_dim=model_dim,
            heads=heads,
            number_text_tokens=number_text_tokens,
            text_tokens={"start_text_token": start_text_token, "stop_text_token": stop_text_token},
            number_mel_codes=number_mel_codes,
            mel_tokens={"start_mel_token": start_mel_token, "stop_mel_token": stop_mel_token},
            use_mel_codes_as_input=use_mel_codes_as_input,
            types=types,
        )
        self.start_text_token, self.stop_text_token = start_text_token, stop_text_token
        self.start_mel_token, self.stop_mel_token = start_mel_token, stop_mel_token
        self.mel_length_compression = mel_length_compression
        self.average_conditioning_embeddings = average_conditioning_embeddings
        self.freeze_all_but_positions = freeze_everything_but_position_embeddings
        self.max_mel_tokens = max_mel_tokens
        mel_rows = max_mel_tokens + 2 + max_conditioning_inputs  # as DLAS sizes it
        text_rows = max_text_tokens + 2

        self.conditioning_encoder = ConditioningEncoder(
            80, model_dim, heads, raw_residual=tortoise_compat, checkpointing=checkpointing_enabled
        )
        self.text_embedding = nn.Embedding(number_text_tokens, model_dim)
        self.mel_embedding = nn.Embedding(number_mel_codes, model_dim)
        for table in (self.text_embedding, self.mel_embedding):
            nn.init.normal_(table.weight, std=0.02)
        self.gpt = GPT2(
            model_dim,
            layers,
            heads,
            n_positions=mel_rows + text_rows,
            checkpointing=checkpointing or checkpointing_enabled,
        )
        self.mel_pos_embedding = LearnedPositions(mel_rows, model_dim)
        self.text_pos_embedding = LearnedPositions(text_rows, model_dim)
        if train_solo_embeddings:
            self.mel_solo_embedding = nn.Parameter(torch.randn(1, 1, model_dim) * 0.02)
            self.text_solo_embedding = nn.Parameter(torch.randn(1, 1, model_dim) * 0.02)
        self.final_norm = nn.LayerNorm(model_dim)
        self.text_head = nn.Linear(model_dim, number_text_tokens)
        self.mel_head = nn.Linear(model_dim, number_mel_codes)
        if freeze_everything_but_position_embeddings:
            self.requires_grad_(True)

    # ------------------------------------------------------------------ checkpoints
    def requires_grad_(self, requires_grad: bool = True) -> UnifiedVoice2:
        """As nn.Module's, except that with ``freeze_everything_but_position_embeddings``
        only the two position tables can be made trainable."""
        super().requires_grad_(requires_grad)
        if self.freeze_all_but_positions:
            for name, p in self.named_parameters():
                p.requires_grad_(requires_grad and name.endswith("pos_embedding.emb.weight"))
        return self

    def adapt_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the causal-mask buffers (``gpt.h.{i}.attn.bias`` / ``.masked_bias``) that
        transformers < 4.31 saved in ``autoregressive.pth``; every other key is compared."""
        return {k: v for k, v in state.items() if not _LEGACY_KEY.match(k)}

    def legacy_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with those buffers put back where old transformers had them (after
        ``gpt.h.{i}.ln_1.bias``), for consumers that load with an old transformers strictly."""
        extra = self.gpt.legacy_buffers(prefix="gpt.")
        out: dict[str, torch.Tensor] = {}
        for k, v in self.state_dict().items():
            out[k] = v
            if k.endswith(".ln_1.bias") and k.startswith("gpt.h."):
                block = k[: -len("ln_1.bias")] + "attn."
                out.update({block + name: t for name, t in extra[block].items()})
        return out

    # ------------------------------------------------------------------ conditioning
    def get_conditioning(self, cond_mels: torch.Tensor) -> torch.Tensor:
        """Voice latent [B, D]: mean over clips of [B, N, 80, T] (or one clip [B, 80, T]),
        as Tortoise computes it for inference."""
        return self._encode_clips(cond_mels).mean(dim=1)

    def _encode_clips(self, cond_mels: torch.Tensor) -> torch.Tensor:
        """[B, N, 80, T] or [B, 80, T] -> per-clip encodings [B, N, D]."""
        if cond_mels.dim() == 3:
            cond_mels = cond_mels[:, None]
        if cond_mels.dim() != 4:
            raise ValueError(
                f"conditioning mels must be [B, N, 80, T] or [B, 80, T], got "
                f"{list(cond_mels.shape)}"
            )
        return torch.stack(
            [self.conditioning_encoder(cond_mels[:, j]) for j in range(cond_mels.shape[1])], 1
        )

    def conditioning_tokens(self, conditioning: torch.Tensor) -> torch.Tensor:
        """The tokens in front of the text [B, N, D]: a precomputed latent [B, D] is one
        token (Tortoise's forward); mels give one token per clip, or their mean with
        ``average_conditioning_embeddings``."""
        if conditioning.dim() == 2:
            return conditioning[:, None]
        conds = self._encode_clips(conditioning)
        return conds.mean(dim=1, keepdim=True) if self.average_conditioning_embeddings else conds

    # ------------------------------------------------------------------ training
    def forward(
        self,
        speech_conditioning_input: torch.Tensor,
        text_inputs: torch.Tensor,
        text_lengths: torch.Tensor,
        mel_codes: torch.Tensor,
        wav_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss_text, loss_mel, mel_logits [B, number_mel_codes, m + 2]) as DLAS computes them.

        ``speech_conditioning_input``: mels [B, N, 80, T] / [B, 80, T], or a latent [B, D];
        ``text_inputs`` [B, Tt] (0-padded), ``text_lengths`` [B]; ``mel_codes`` [B, Tm];
        ``wav_lengths`` [B] in samples. Losses are means over every position, padding
        included (DLAS). ``mel_codes`` is not modified.
        """
        conds = self.conditioning_tokens(speech_conditioning_input)  # [B, N, D]
        text_in, text_tgt, mel_in, mel_tgt = self.training_sequences(
            text_inputs, text_lengths, mel_codes, wav_lengths
        )
        text_logits, mel_logits = self.logits(conds, text_in, mel_in)
        loss_text = F.cross_entropy(text_logits, text_tgt)
        loss_mel = F.cross_entropy(mel_logits, mel_tgt)
        return loss_text, loss_mel, mel_logits

    def training_sequences(
        self,
        text_inputs: torch.Tensor,
        text_lengths: torch.Tensor,
        mel_codes: torch.Tensor,
        wav_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text inputs, text targets [B, n + 2], mel inputs, mel targets [B, m + 2]).

        Text is cut to n = max(text_lengths); codes to m = max(wav_lengths) // compression;
        item b keeps wav_lengths[b] // compression + 1 codes (one past its true end: codes
        come from convolutions), the rest become stop tokens.
        """
        n = int(text_lengths.max())
        m = int(wav_lengths.max()) // self.mel_length_compression
        text = F.pad(text_inputs[:, :n].long(), (0, 1), value=self.stop_text_token)
        codes = F.pad(mel_codes[:, :m].long(), (0, 1), value=self.stop_mel_token)  # a copy
        end = (wav_lengths // self.mel_length_compression + 1)[:, None]  # [B, 1]
        past_end = torch.arange(m + 1, device=codes.device)[None] >= end.to(codes.device)
        codes = codes.masked_fill(past_end, self.stop_mel_token)
        text_in = F.pad(text, (1, 0), value=self.start_text_token)
        text_tgt = F.pad(text, (0, 1), value=self.stop_text_token)
        mel_in = F.pad(codes, (1, 0), value=self.start_mel_token)
        mel_tgt = F.pad(codes, (0, 1), value=self.stop_mel_token)
        return text_in, text_tgt, mel_in, mel_tgt

    def logits(
        self, conds: torch.Tensor, text_in: torch.Tensor, mel_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text logits [B, V_text, Lt], mel logits [B, V_mel, Lm]) of the whole sequence.

        Like DLAS, GPT-2 output 0 is dropped and text logits are read from outputs 1..Lt:
        the right next-token alignment only for one conditioning token (with N tokens each
        text logit is scored N - 1 tokens further ahead). Mel logits are read from the end.
        """
        lt, lm = text_in.shape[1], mel_in.shape[1]
        self._check_lengths(conds.shape[1], lt, lm)
        text = self.text_embedding(text_in) + self.text_pos_embedding(lt)  # [B, Lt, D]
        mel = self.mel_embedding(mel_in) + self.mel_pos_embedding(lm)  # [B, Lm, D]
        h, _ = self.gpt(torch.cat([conds.to(text.dtype), text, mel], dim=1))
        h = self.final_norm(h[:, 1:])  # [B, N - 1 + Lt + Lm, D]
        text_logits = self.text_head(h[:, :lt]).transpose(1, 2)
        mel_logits = self.mel_head(h[:, -lm:]).transpose(1, 2)
        return text_logits, mel_logits

    def _check_lengths(self, n: int, lt: int, lm: int) -> None:
        text_rows = self.text_pos_embedding.emb.num_embeddings
        mel_rows = self.mel_pos_embedding.emb.num_embeddings
        if lt > text_rows or lm > mel_rows or n + lt + lm > self.gpt.n_positions:
            raise ValueError(
                f"sequence too long for unified_voice2: {n} conditioning + {lt} text (table "
                f"{text_rows}) + {lm} mel tokens (table {mel_rows}), context "
                f"{self.gpt.n_positions}; shorten the data (max_text_length / max_wav_length) "
                f"or raise max_text_tokens / max_mel_tokens"
            )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        conditioning: torch.Tensor,
        text: torch.Tensor,
        max_mel_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        kv_cache: bool = True,
        generator: torch.Generator | None = None,
        text_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel codes for ``text`` [B, L] (ids without start/stop, right-padded) in the voice
        ``conditioning`` (mels or a latent, as in ``forward``).

        ``text_lengths`` [B] are the rows' true lengths (None: all L). Each item reads
        [conditioning | start_text, its text, stop_text | start_mel, codes] with text
        positions 0..len + 1, as in training; shorter texts are padded on the left of their
        text segment (after the conditioning) and the padding is masked out of attention,
        so an item's logits are those it gets alone (and its greedy codes the same).

        Returns (codes [B, S], the logits each was chosen from [B, S, V]); an item's codes
        after its stop token are stop tokens, and generation ends when every item has
        stopped (or after ``max_mel_tokens``). temperature 0 is greedy, else sampling with
        ``top_k`` / ``top_p``. The code fed at step s sits at mel position s, as in
        training, with or without ``kv_cache`` (Tortoise's cache puts it at s + 1).
        """
        limit = min(max_mel_tokens or self.max_mel_tokens, self.max_mel_tokens)
        b = text.shape[0]
        conds = self.conditioning_tokens(conditioning)
        text_emb, text_mask = self._text_prefix(text, text_lengths)  # [B, Lt, D], [B, Lt]
        self._check_lengths(conds.shape[1], text_emb.shape[1], limit + 1)
        prefix = torch.cat([conds.to(text_emb.dtype), text_emb], dim=1)  # [B, N + Lt, D]
        key_mask = None  # only when some text is padded; else the plain causal paths
        if not bool(text_mask.all()):  # [B, N + Lt + limit + 1]: conditioning, codes are real
            n = conds.shape[1]
            key_mask = text_mask.new_ones(b, prefix.shape[1] + limit + 1)
            key_mask[:, n : n + text_mask.shape[1]] = text_mask
        mel_in = torch.full((b, 1), self.start_mel_token, device=text.device)
        done = torch.zeros(b, dtype=torch.bool, device=text.device)
        past: PastKV | None = None
        all_logits = []
        for step in range(limit):
            if kv_cache and past is not None:  # only the newest token, at its position
                x = self.mel_embedding(mel_in[:, -1:]) + self.mel_pos_embedding(1, start=step)
            else:
                mel = self.mel_embedding(mel_in) + self.mel_pos_embedding(mel_in.shape[1])
                x = torch.cat([prefix, mel], dim=1)
            mask = None if key_mask is None else key_mask[:, : prefix.shape[1] + mel_in.shape[1]]
            h, past = self.gpt(
                x, past=past if kv_cache else None, use_cache=kv_cache, key_mask=mask
            )
            logits = self.mel_head(self.final_norm(h[:, -1]))  # [B, V]
            token = sample(logits, temperature, top_k, top_p, generator)
            token = token.masked_fill(done, self.stop_mel_token)
            done |= token == self.stop_mel_token
            all_logits.append(logits)
            mel_in = torch.cat([mel_in, token[:, None]], dim=1)
            if bool(done.all()):
                break
        return mel_in[:, 1:], torch.stack(all_logits, dim=1)

    def _text_prefix(
        self, text: torch.Tensor, text_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedded [start_text, text, stop_text] [B, n + 2, D], real-slot mask [B, n + 2])
        with n = the longest length: item b's slots are right-aligned, at text positions
        0..len_b + 1; the n - len_b slots in front of them are zero and masked."""
        b, width = text.shape
        if text_lengths is None:
            lengths = torch.full((b,), width, dtype=torch.long, device=text.device)
        else:
            lengths = text_lengths.to(device=text.device, dtype=torch.long)
            if lengths.shape != (b,) or bool((lengths < 0).any() | (lengths > width).any()):
                raise ValueError(
                    f"text_lengths must be [B] = [{b}] values in 0..{width} (the width of "
                    f"text), got {text_lengths.tolist()}"
                )
        n = int(lengths.max()) if b else 0
        # item b, unpadded: [start, text[:len_b], stop]; columns past len_b + 1 are never read
        seq = F.pad(F.pad(text[:, :n].long(), (1, 0), value=self.start_text_token), (0, 1))
        seq.scatter_(1, lengths[:, None] + 1, self.stop_text_token)
        pos = torch.arange(n + 2, device=text.device)[None] - (n - lengths)[:, None]  # [B, n+2]
        real = pos >= 0
        pos = pos.clamp(min=0)
        tokens = seq.gather(1, pos)
        emb = self.text_embedding(tokens) + self.text_pos_embedding.emb(pos)
        return emb * real[..., None].to(emb.dtype), real


def _check_options(
    *,
    model_dim: int,
    heads: int,
    number_text_tokens: int,
    text_tokens: dict[str, int],
    number_mel_codes: int,
    mel_tokens: dict[str, int],
    use_mel_codes_as_input: bool,
    types: int,
) -> None:
    """Raise ValueError for options that cannot build a model (run on the meta device at
    validation, so they are reported with the experiment's other problems)."""
    problems = []
    if model_dim % heads:
        problems.append(f"model_dim {model_dim} must be divisible by heads {heads}")
    for name, token in text_tokens.items():
        if token >= number_text_tokens:
            problems.append(f"{name} {token} must be < number_text_tokens {number_text_tokens}")
    for name, token in mel_tokens.items():
        if token >= number_mel_codes:
            problems.append(f"{name} {token} must be < number_mel_codes {number_mel_codes}")
    if not use_mel_codes_as_input:
        problems.append(
            "use_mel_codes_as_input: False (DLAS's raw-mel input encoder) is not supported; "
            "set it to True"
        )
    if types != 1:
        problems.append(
            f"types {types} is not supported: only 1 (one text table, Tortoise's default)"
        )
    if problems:
        raise ValueError("unified_voice2: " + "; ".join(problems))
