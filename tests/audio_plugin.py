"""Test plugin: a tiny next-code predictor over codec codes and phonemes."""

import torch
import torch.nn.functional as F
from torch import nn

from models import register_model


@register_model("toy_code_lm")
class ToyCodeLM(nn.Module):
    """Predicts each level-0 code from the previous one plus the mean phoneme embedding."""

    def __init__(self, codebook_size: int = 16, n_phonemes: int = 128, dim: int = 32) -> None:
        super().__init__()
        self.codes = nn.Embedding(codebook_size, dim)
        self.phonemes = nn.Embedding(n_phonemes, dim, padding_idx=0)
        self.head = nn.Linear(dim, codebook_size)

    def forward(self, codes, code_lengths, phonemes):
        level0 = codes[:, 0]  # [B, T]
        context = self.phonemes(phonemes).mean(1, keepdim=True)  # [B, 1, dim]
        logits = self.head(self.codes(level0[:, :-1]) + context)  # [B, T-1, K]
        target = level0[:, 1:].clone()
        steps = torch.arange(target.shape[1], device=codes.device)
        target[steps[None] >= (code_lengths[:, None] - 1)] = -100  # padding
        return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
