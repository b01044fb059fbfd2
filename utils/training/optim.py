"""AdamW with reAR's weight-decay exclusions, and the learning-rate schedule (linear warm-up, half cosine).

Both count *optimizer* steps: the schedule is stepped once per update, whatever the number of processes or
gradient-accumulation micro-batches.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

# A parameter whose name contains one of these (or with fewer than 2 dims) gets no weight decay, as in the
# released code; e.g. the head's `adaln_before_head.*` is exempt through "ln".
NO_DECAY_NAME_PARTS = ("ln", "bias", "embedding", "norm", "gamma", "embed", "mask_token", "latent_tokens")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config, device: torch.device, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW from `optimizer.params`; the fused CUDA kernel when on CUDA and `optimizer.params.fused` (or `fused`)."""
    p = config.optimizer.params
    fused = p.fused if fused is None else fused
    return torch.optim.AdamW(
        param_groups(model, p.weight_decay),
        lr=p.learning_rate,
        betas=(p.beta1, p.beta2),
        eps=p.epsilon,
        fused=bool(fused and device.type == "cuda") or None,
    )


def learning_rate_at(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then half a cosine down to `end_lr` at `total_steps`."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_scheduler.params` with `training.max_train_steps`, as a multiplier of the optimizer's base lr."""
    s = config.lr_scheduler.params
    total, base = config.training.max_train_steps, config.optimizer.params.learning_rate
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, base, s.end_lr, s.warmup_steps, total) / base
    )
