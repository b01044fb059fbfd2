"""The layers LlamaGen's GPT (FoundationVision/LlamaGen `autoregressive/models/gpt.py`) and the backbones derived from
it share: RMSNorm, the SwiGLU feed-forward with LlamaGen's rule for its width, and LlamaGen's initialisation.
AliTok's AR (`alitok_ar.py`) and GigaTok's GPT-1D (`gpt1d.py`) use them under their own originals' module names."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FFN_MULTIPLE_OF = 256  # LlamaGen's ModelArgs.multiple_of
INIT_STD = 0.02  # LlamaGen's ModelArgs.initializer_range


def normal_init(modules: Iterable[nn.Module]) -> None:
    """LlamaGen's initialisation: Normal(0, 0.02) for every Linear and Embedding weight, zero biases (in the order of
    `modules`, so that a seed gives the original's weights)."""
    for module in modules:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class RMSNorm(nn.Module):
    """x / rms(x) · weight, normalised in float32 (eps 1e-5: LlamaGen's norm_eps, which no original changes)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def ffn_hidden_size(dim: int) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4·dim, rounded up to a multiple of 256 (2048 for 768, 3584 for 1280)."""
    hidden = int(2 * (4 * dim) / 3)
    return -(-hidden // FFN_MULTIPLE_OF) * FFN_MULTIPLE_OF


class FeedForward(nn.Module):
    """SwiGLU without biases: w2(silu(w1 x) · w3 x), then dropout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        hidden = ffn_hidden_size(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


__all__ = ["FeedForward", "RMSNorm", "ffn_hidden_size", "normal_init"]
