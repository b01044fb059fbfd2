"""Training metrics summed on the device between logging steps, so the step itself never waits for the host."""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, Dict, Sequence

import torch

from modeling.losses import LossParts

NAMES = ("loss", "ce", "encode_alignment", "decode_alignment", "token_accuracy", "grad_norm")


@torch.no_grad()
def mean_parts(parts: Sequence[LossParts]) -> LossParts:
    """The loss parts of one optimizer step: the mean over its gradient-accumulation micro-batches."""
    return LossParts(*(torch.stack([getattr(p, f.name).detach() for p in parts]).mean() for f in fields(LossParts)))


class MetricWindow:
    """Running sums of the loss parts and the gradient norm, and the first step whose loss or gradient was not
    finite (-1 while none was). Reading them (`averages`) is the only synchronisation."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(NAMES), device=device)
        self.count = 0
        self.first_non_finite = torch.full((), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def add(self, parts: LossParts, grad_norm: torch.Tensor, step: int) -> None:
        values = torch.stack(
            [parts.loss, parts.ce, parts.encode_alignment, parts.decode_alignment, parts.accuracy, grad_norm]
        ).float()
        self.sums += values
        self.count += 1
        bad = ~torch.isfinite(values[[0, 5]]).all() & (self.first_non_finite < 0)
        self.first_non_finite = torch.where(bad, torch.full_like(self.first_non_finite, step), self.first_non_finite)

    def averages(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> Dict[str, float]:
        """The window's averages (after `reduce`, e.g. a mean over processes); starts a new window."""
        values = (reduce(self.sums) / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(NAMES, values))
