"""Choosing the next token: the per-token primitives every sampler shares, and nothing else.

The readable loop (`modeling.generator.Generator.generate`), the fast sampler (`modeling/fast_sampler.py`) and the
backbones' own guidance schedules (`modeling/backbones/`) all draw their tokens through this module, which imports no
other part of `modeling`:
- guidance schedules: the scale of classifier-free guidance at each token, by name (`GUIDANCE_SCHEDULES`; RAR's
  `cosine_power` here, GigaTok's registered by `backbones/gpt1d.py`), and what one sampling call asks of them
  (`Guidance`);
- filtering: top-k, then top-p (`filter_logits`);
- drawing a token: guidance mix, temperature, filtering and one multinomial draw for the whole batch
  (`sample_next_token`), as the originals draw, so that their random streams are reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.config import register_entry

MIN_TEMPERATURE = 1e-5  # GigaTok's floor (a lower positive temperature divides by it); RAR and AliTok have none
DEFAULT_GUIDANCE_WINDOW = (0.18, 1.0)


# ----------------------------------------------------------------------------------------- guidance schedules
@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of one sampling call: the scale and what its schedule reads."""

    scale: float
    power: float = 1.0  # cosine_power's exponent
    schedule: Optional[str] = None  # a name in GUIDANCE_SCHEDULES; None: the backbone's own
    window: Tuple[float, float] = DEFAULT_GUIDANCE_WINDOW  # step / rectangular: where the full scale applies
    interval: int = -1  # GigaTok's cfg_interval (see Generator.guidance_scale_at); -1: guide every token


def cfg_scale_at(step: int, num_steps: int, guidance_scale: float, power: float, device=None) -> Tensor:
    """RAR's schedule: 1 at the first token, rising on a cosine of (step/N)^power to `guidance_scale`.

    Computed in float32 exactly as the original sampler does, so that sampled tokens match it bit for bit.
    """
    scale_pow = torch.ones(1, device=device) * power
    s = (1 - torch.cos(((step / num_steps) ** scale_pow) * torch.pi)) * 1 / 2
    return (guidance_scale - 1) * s + 1


# schedule(step, num_steps, guidance, device) -> the scale of token `step` (a float32 tensor or a Python float, as
# its original computes it: the mix is then bit for bit the original's)
GuidanceSchedule = Callable[[int, int, Guidance, Optional[torch.device]], Union[Tensor, float]]
GUIDANCE_SCHEDULES: Dict[str, GuidanceSchedule] = {}


def register_guidance_schedule(name: str) -> Callable[[GuidanceSchedule], GuidanceSchedule]:
    return lambda schedule: register_entry(GUIDANCE_SCHEDULES, "model.generator.guidance_schedule", "guidance schedule",
                                           name, schedule)


@register_guidance_schedule("cosine_power")
def cosine_power(step: int, num_steps: int, guidance: Guidance, device=None) -> Tensor:
    """RAR's (and AliTok's) schedule: `cfg_scale_at`."""
    return cfg_scale_at(step, num_steps, guidance.scale, guidance.power, device)


# ----------------------------------------------------------------------------------------- one token
def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Keep the `top_k` largest logits, then the most likely tokens up to and including the first at which the
    cumulative probability exceeds `top_p` (LlamaGen's and GigaTok's rule; top_p = 1 keeps every token)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:  # at 1 a cumulative sum that rounds above 1 would drop the least likely tokens
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            over = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
            drop_sorted = torch.zeros_like(over)
            drop_sorted[..., 1:] = over[..., :-1]  # the token that crosses top_p is kept
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_next_token(
    logits: Tensor, cfg_scale: Union[Tensor, float, None], temperature: float, top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Tensor:
    """One sampling step from logits of the newest position. With `cfg_scale`, the rows are [conditional; null class]
    and are mixed as uncond + (cond - uncond)·cfg. Then temperature, optional top-k / top-p, and one multinomial draw
    for the whole batch, as the original samplers do (their random stream depends on that one call)."""
    if cfg_scale is not None:
        cond, uncond = logits.chunk(2)
        logits = uncond + (cond - uncond) * cfg_scale
    logits = filter_logits(logits / max(temperature, MIN_TEMPERATURE), top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


Progress = Callable[[int, int], None]  # progress(t, N) after the t-th of N tokens: a page's progress bar


__all__ = ["DEFAULT_GUIDANCE_WINDOW", "GUIDANCE_SCHEDULES", "MIN_TEMPERATURE", "Guidance", "Progress", "cfg_scale_at",
           "cosine_power", "filter_logits", "register_guidance_schedule", "sample_next_token"]
