"""Sampling tokens from any backbone: one loop, the guidance schedules, and the sampling step.

The loop (`generate`) is the readable sampler every backbone shares; what differs between the originals' samplers is
a backbone's attribute (its guidance schedule, its extra random draws before the first step), so one loop draws
each original's tokens for a fixed seed. `generate_tokens` is the one call site of sampling for scripts: it picks
the fast sampler (`modeling/fast_sampler.py`: static cache, CUDA graph) where a backbone has one, else this loop.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------- guidance schedules
def cfg_scale_at(step: int, num_steps: int, guidance_scale: float, power: float, device=None) -> Tensor:
    """RAR's schedule: 1 at the first token, rising on a cosine of (step/N)^power to `guidance_scale`.

    Computed in float32 exactly as the original sampler does, so that sampled tokens match it bit for bit.
    """
    scale_pow = torch.ones(1, device=device) * power
    s = (1 - torch.cos(((step / num_steps) ** scale_pow) * torch.pi)) * 1 / 2
    return (guidance_scale - 1) * s + 1


GuidanceSchedule = Callable[[int, int, float, float, Optional[torch.device]], Tensor]
GUIDANCE_SCHEDULES: Dict[str, GuidanceSchedule] = {"cosine_power": cfg_scale_at}


def register_guidance_schedule(name: str) -> Callable[[GuidanceSchedule], GuidanceSchedule]:
    def register(schedule: GuidanceSchedule) -> GuidanceSchedule:
        GUIDANCE_SCHEDULES[name] = schedule
        return schedule

    return register


# ----------------------------------------------------------------------------------------- one step
def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Keep the `top_k` largest logits and/or the smallest set whose probability reaches `top_p`."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: Tensor, cfg_scale: Optional[Tensor], temperature: float, top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Tensor:
    """One sampling step from logits of the newest position. With `cfg_scale`, the rows are [conditional; null class]
    and are mixed as uncond + (cond - uncond)·cfg. Then temperature, optional top-k / top-p, and one multinomial draw
    for the whole batch, as the original sampler does (its random stream depends on that one call)."""
    if cfg_scale is not None:
        cond, uncond = logits.chunk(2)
        logits = uncond + (cond - uncond) * cfg_scale
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


# ----------------------------------------------------------------------------------------- the loop
@torch.no_grad()
def generate(
    model: nn.Module,
    class_ids: Tensor,
    guidance_scale: float,
    guidance_scale_pow: float,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    kv_cache: bool = True,
    guidance_schedule: Optional[str] = None,
) -> Tensor:
    """Sample (B, N) image tokens from a backbone for raw class labels (B,), with classifier-free guidance when
    `guidance_scale` != 0 (rows [conditional; null class] in one batch). With `kv_cache` each step runs only the
    newest position; without it the whole prefix is recomputed (the originals' reference path)."""
    model.check_ids(None, class_ids)
    model.start_sampling(class_ids)
    batch, n = len(class_ids), model.image_seq_len
    use_cfg = guidance_scale != 0
    schedule = GUIDANCE_SCHEDULES[guidance_schedule or model.guidance_schedule]
    if use_cfg:
        class_ids = torch.cat([class_ids, torch.full_like(class_ids, model.null_class)])
    caches = model.new_caches(len(class_ids)) if kv_cache else None
    tokens = class_ids.new_empty(batch, 0)
    for step in range(n):
        prefix = torch.cat([tokens, tokens]) if use_cfg else tokens
        logits = model.next_token_logits(prefix, class_ids, caches)
        cfg = schedule(step, n, guidance_scale, guidance_scale_pow, logits.device) if use_cfg else None
        tokens = torch.cat([tokens, sample_next_token(logits, cfg, temperature, top_k, top_p)], dim=1)
    return tokens


# ----------------------------------------------------------------------------------------- the call site
@dataclass(frozen=True)
class SamplingOptions:
    guidance_scale: float
    guidance_scale_pow: float
    temperature: float
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    kv_cache: bool = True
    sampler: str = "fast"  # fast | plain
    precision: str = "fp32"  # fp32 | bf16 (CUDA only; elsewhere fp32)

    @classmethod
    def from_config(cls, config) -> "SamplingOptions":
        """`sampling.*`, where None means the model's released default in `model.generator.*`."""
        s, g = config.sampling, config.model.generator

        def pick(value, default):
            return default if value is None else value

        return cls(
            guidance_scale=pick(s.guidance_scale, g.guidance_scale),
            guidance_scale_pow=pick(s.guidance_scale_pow, g.guidance_scale_pow),
            temperature=pick(s.temperature, g.randomize_temperature),
            top_k=s.top_k,
            top_p=s.top_p,
            kv_cache=g.kv_cache,
            sampler=str(s.sampler),
            precision=str(s.precision),
        )

    def settings(self) -> dict:
        """What the sampled tokens depend on, as plain values (for the record a sampling folder keeps)."""
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def effective_precision(precision: str, device: torch.device) -> str:
    """bf16 runs on CUDA only; elsewhere sampling is fp32."""
    return precision if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast on CUDA; fp32 otherwise (the scripts allow TF32 matmuls on CUDA, as the original sampler did)."""
    if effective_precision(precision, device) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# One fast sampler per (model, batch rows, guidance, dtype): built once, its buffers (and CUDA graph) reused.
_FAST_SAMPLERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def fast_sampler_for(model: nn.Module, batch_size: int, guidance: bool, precision: str):
    from modeling.fast_sampler import FastSampler

    device = next(model.parameters()).device
    dtype = torch.bfloat16 if effective_precision(precision, device) == "bf16" else None
    samplers = _FAST_SAMPLERS.setdefault(model, {})
    key = (batch_size, guidance, dtype)
    if key not in samplers:
        samplers[key] = FastSampler(model, batch_size, guidance=guidance, dtype=dtype)
    return samplers[key]


def generate_tokens(model: nn.Module, class_ids: Tensor, options: SamplingOptions) -> Tensor:
    """Image tokens (B, N) for raw labels (B,): THE call site of the samplers for every script.

    `options.sampler == "fast"` uses the backbone's fast sampler when it has one (`model.has_fast_sampler`), one per
    batch shape (so the last, smaller batch of a run gets its own); otherwise, and with `sampler: plain`, the
    readable loop. Both draw the same tokens on a CPU in fp32 (tested)."""
    if options.sampler == "fast" and getattr(model, "has_fast_sampler", False) and options.kv_cache:
        sampler = fast_sampler_for(model, len(class_ids), options.guidance_scale != 0, options.precision)
        return sampler.generate(class_ids, options.guidance_scale, options.guidance_scale_pow, options.temperature,
                                options.top_k, options.top_p)
    with autocast(options.precision, class_ids.device):
        return model.generate(class_ids, guidance_scale=options.guidance_scale,
                              guidance_scale_pow=options.guidance_scale_pow, temperature=options.temperature,
                              top_k=options.top_k, top_p=options.top_p, kv_cache=options.kv_cache)


@torch.no_grad()
def sample_images(generator: nn.Module, tokenizer: nn.Module, class_ids: Tensor, options: SamplingOptions,
                  decode_batch_size: Optional[int] = None) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] for raw labels (B,), drawn from the current global torch random state."""
    was_training = generator.training
    generator.eval()
    try:
        tokens = generate_tokens(generator, class_ids, options)
    finally:
        generator.train(was_training)
    chunk = decode_batch_size or len(tokens)
    with autocast(options.precision, class_ids.device):
        return torch.cat([tokenizer.decode_tokens(part).float() for part in tokens.split(chunk)])


@torch.no_grad()
def sample_images_seeded(generator: nn.Module, tokenizer: nn.Module, class_ids: Tensor, options: SamplingOptions,
                         seed: int, batch_size: int = 256) -> Tensor:
    """`sample_images` in chunks of `batch_size` from `seed`, with the global random state forked, so that sampling
    in the middle of training leaves the training stream (and so an exact resume) untouched."""
    devices = [class_ids.device] if class_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.cat([sample_images(generator, tokenizer, chunk, options) for chunk in class_ids.split(batch_size)])


def to_uint8(images: Tensor):
    """Images (B, 3, H, W) in [0, 1] → uint8 numpy (B, H, W, 3). Truncates like the original sampler
    (`(x * 255).to(uint8)`), but in float32, so that a bf16 decoder output is not rounded to bf16 first."""
    return (images.float().clamp(0.0, 1.0) * 255.0).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


__all__ = [
    "GUIDANCE_SCHEDULES",
    "SamplingOptions",
    "cfg_scale_at",
    "effective_precision",
    "filter_logits",
    "generate",
    "generate_tokens",
    "register_guidance_schedule",
    "sample_images",
    "sample_images_seeded",
    "sample_next_token",
    "to_uint8",
]
