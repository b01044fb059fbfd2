"""Exponential moving average of the generator's weights (training.use_ema), as the original release does it.

After optimizer step t (t = 1, 2, ...) every shadow weight moves towards the weight by
    shadow ← shadow − (1 − d_t)·(shadow − weight),   d_t = min((1 + s) / (10 + s), decay), s = t − 1,
with d_1 = 0 (the first update copies the weights). The original creates it with decay 0.999
(`training.ema_decay`). The step is saved with the shadows, so a resumed run continues the warm-up where it was.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn

STEP_KEY = "__ema_step__"


def ema_decay_at(step: int, decay: float) -> float:
    """d_t of the update after optimizer step `step` (1-based)."""
    s = step - 1
    if s <= 0:
        return 0.0
    return min((1 + s) / (10 + s), decay)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.step = decay, 0
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self.copy = None  # the model with the averaged weights, for sampling (`averaged_model`)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step += 1
        one_minus_decay = 1.0 - ema_decay_at(self.step, self.decay)
        weights = [p.detach() for p in model.parameters()]
        torch._foreach_sub_(self.shadow, torch._foreach_mul(torch._foreach_sub(self.shadow, weights), one_minus_decay))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {**dict(zip(self.names, self.shadow)), STEP_KEY: torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name])
        self.step = int(state[STEP_KEY]) if STEP_KEY in state else 0

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """`model` with the averaged weights: one copy, made once (not a new model, whose random init would draw from
        the training stream) and refreshed in place at each call, so that its samplers' buffers are reused."""
        if self.copy is None:
            self.copy = copy.deepcopy(model)
        self.copy.load_state_dict(self.model_state_dict(model))
        return self.copy

    def model_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """`model.state_dict()` with the averaged weights in place of the parameters (buffers as they are)."""
        state = model.state_dict()
        for name, shadow in zip(self.names, self.shadow):
            state[name] = shadow.to(state[name].dtype)
        return state
