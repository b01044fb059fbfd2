"""Exponential moving average of the generator's weights (training.use_ema; off in the released configs)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EMA:
    """shadow ← decay · shadow + (1 − decay) · weights, after every optimizer step; float32 shadows."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weights = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name])

    def model_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """`model.state_dict()` with the averaged weights in place of the parameters (buffers as they are)."""
        state = model.state_dict()
        for name, shadow in zip(self.names, self.shadow):
            state[name] = shadow.to(state[name].dtype)
        return state
