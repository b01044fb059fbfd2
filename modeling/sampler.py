"""Sampling tokens from any backbone: one loop, the guidance schedules, and the sampling step.

The loop (`generate`) is the readable sampler every backbone shares; what differs between the originals' samplers is
the backbone's (its guidance schedule, which scales guide at all, the scale of each token, its extra random draws
before the first step: `modeling.generator.Generator`), so one loop draws each original's tokens for a fixed seed.
A backbone module registers its original's schedules with `register_guidance_schedule`. `generate_tokens` is the
one call site of sampling for scripts: it picks the fast sampler (`modeling/fast_sampler.py`: static cache, CUDA
graph) where it serves the backbone and the settings (`why_not_fast`), else this loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.config import register_choice

MIN_TEMPERATURE = 1e-5  # GigaTok's floor (a lower positive temperature divides by it); RAR and AliTok have none


# ----------------------------------------------------------------------------------------- guidance schedules
DEFAULT_GUIDANCE_WINDOW = (0.18, 1.0)


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
    def register(schedule: GuidanceSchedule) -> GuidanceSchedule:
        if name in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance schedule '{name}' is already registered")
        GUIDANCE_SCHEDULES[name] = schedule
        register_choice("model.generator.guidance_schedule", name)
        return schedule

    return register


@register_guidance_schedule("cosine_power")
def cosine_power(step: int, num_steps: int, guidance: Guidance, device=None) -> Tensor:
    """RAR's (and AliTok's) schedule: `cfg_scale_at`."""
    return cfg_scale_at(step, num_steps, guidance.scale, guidance.power, device)


# ----------------------------------------------------------------------------------------- one step
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


# ----------------------------------------------------------------------------------------- the loop
Progress = Callable[[int, int], None]  # (tokens drawn, tokens per image): a page's progress bar


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
    guidance_window: Tuple[float, float] = DEFAULT_GUIDANCE_WINDOW,
    cfg_interval: int = -1,
    progress: Optional[Progress] = None,
) -> Tensor:
    """Sample (B, N) image tokens from a backbone for raw class labels (B,), with classifier-free guidance when the
    backbone `uses_guidance` at this scale (rows [conditional; null class] in one batch; each token's scale from
    `model.guidance_scale_at`). With `kv_cache` each step runs only the newest position; without it the whole
    prefix is recomputed (the originals' reference path). `progress(t, N)` is called after the t-th token."""
    model.check_ids(None, class_ids)
    model.start_sampling(class_ids)
    batch, n = len(class_ids), model.image_seq_len
    guidance = Guidance(guidance_scale, guidance_scale_pow, guidance_schedule, tuple(guidance_window), cfg_interval)
    use_cfg = model.uses_guidance(guidance_scale)
    if use_cfg:
        class_ids = torch.cat([class_ids, torch.full_like(class_ids, model.null_class)])
    caches = model.new_caches(len(class_ids)) if kv_cache else None
    tokens = class_ids.new_empty(batch, 0)
    for step in range(n):
        prefix = torch.cat([tokens, tokens]) if use_cfg else tokens
        logits = model.next_token_logits(prefix, class_ids, caches)
        cfg = model.guidance_scale_at(step, guidance, logits.device) if use_cfg else None
        if use_cfg and cfg is None:
            logits = logits[:batch]  # guidance over: the conditional rows alone
        tokens = torch.cat([tokens, sample_next_token(logits, cfg, temperature, top_k, top_p)], dim=1)
        if progress is not None:
            progress(step + 1, n)
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
    guidance_schedule: Optional[str] = None  # None: the backbone's own
    guidance_window: Tuple[float, float] = DEFAULT_GUIDANCE_WINDOW
    cfg_interval: int = -1

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
            guidance_schedule=g.guidance_schedule,
            guidance_window=tuple(g.guidance_window),
            cfg_interval=g.cfg_interval,
        )

    def guidance(self) -> dict:
        """The keyword arguments of `generate` beyond the scale and power: the schedule and where it guides."""
        return dict(guidance_schedule=self.guidance_schedule, guidance_window=self.guidance_window,
                    cfg_interval=self.cfg_interval)

    def settings(self) -> dict:
        """What the sampled tokens depend on, as plain values (for the record a sampling folder keeps)."""
        return {key: list(value) if isinstance(value := getattr(self, key), tuple) else value
                for key in self.__dataclass_fields__}


def effective_precision(precision: str, device: torch.device) -> str:
    """bf16 runs on CUDA only; elsewhere sampling is fp32."""
    return precision if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast on CUDA; fp32 otherwise (the scripts allow TF32 matmuls on CUDA, as the original sampler did)."""
    if effective_precision(precision, device) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()




def fast_sampler_for(model: nn.Module, batch_size: int, guidance: bool, precision: str):
    from modeling.fast_sampler import FastSampler

    device = next(model.parameters()).device
    dtype = torch.bfloat16 if effective_precision(precision, device) == "bf16" else None
    # One per (batch rows, guidance, dtype), kept on the model: built once, its buffers (and CUDA graph) reused, and
    # freed with the model.
    samplers = model.__dict__.setdefault("_fast_samplers", {})
    key = (batch_size, guidance, dtype)
    if key not in samplers:
        samplers[key] = FastSampler(model, batch_size, guidance=guidance, dtype=dtype)
    return samplers[key]


def why_not_fast(model: nn.Module, options: SamplingOptions) -> Optional[str]:
    """Why `generate_tokens` samples with the readable loop rather than the fast sampler; None when it does not."""
    if options.sampler != "fast":
        return "sampling.sampler is plain"
    if not getattr(model, "has_fast_sampler", False):
        return f"the fast sampler serves the rar backbone only; {type(model).__name__} samples with the readable loop"
    if not options.kv_cache:
        return "model.generator.kv_cache is off"
    if (options.guidance_schedule or model.guidance_schedule) != "cosine_power" or options.cfg_interval != -1:
        return "the fast sampler guides with RAR's cosine_power schedule only (no cfg_interval)"
    return None


def generate_tokens(model: nn.Module, class_ids: Tensor, options: SamplingOptions,
                    progress: Optional[Progress] = None) -> Tensor:
    """Image tokens (B, N) for raw labels (B,): THE call site of the samplers for every script.

    The fast sampler (one per batch shape, so the last, smaller batch of a run gets its own) where it serves the
    backbone and the options (`why_not_fast`), else the readable loop. Both draw the same tokens on a CPU in fp32
    (tested). `progress(t, N)` is called after the t-th token."""
    if why_not_fast(model, options) is None:
        sampler = fast_sampler_for(model, len(class_ids), options.guidance_scale != 0, options.precision)
        return sampler.generate(class_ids, options.guidance_scale, options.guidance_scale_pow, options.temperature,
                                options.top_k, options.top_p, progress=progress)
    with autocast(options.precision, class_ids.device):
        return model.generate(class_ids, guidance_scale=options.guidance_scale,
                              guidance_scale_pow=options.guidance_scale_pow, temperature=options.temperature,
                              top_k=options.top_k, top_p=options.top_p, kv_cache=options.kv_cache,
                              **options.guidance(), progress=progress)


@torch.no_grad()
def decode_in_batches(tokenizer: nn.Module, tokens: Tensor, batch_size: Optional[int] = None) -> Tensor:
    """`tokenizer.decode_tokens(tokens)` run `batch_size` rows at a time (all at once for None), which bounds the
    decoder's activations."""
    return torch.cat([tokenizer.decode_tokens(part) for part in tokens.split(batch_size or len(tokens))])


@torch.no_grad()
def sample(generator: nn.Module, tokenizer: nn.Module, class_ids: Tensor, options: SamplingOptions,
           decode_batch_size: Optional[int] = None, progress: Optional[Progress] = None) -> tuple[Tensor, Tensor]:
    """Tokens (B, N) and the tokenizer's decoded images (B, 3, H, W) for raw labels (B,), drawn from the current
    global torch random state; the generator samples in eval mode and is put back as it was. `progress(t, N)` is
    called after the t-th token."""
    was_training = generator.training
    generator.eval()
    try:
        tokens = generate_tokens(generator, class_ids, options, progress)
    finally:
        generator.train(was_training)
    with autocast(options.precision, class_ids.device):
        return tokens, decode_in_batches(tokenizer, tokens, decode_batch_size)


def sample_images(generator: nn.Module, tokenizer: nn.Module, class_ids: Tensor, options: SamplingOptions,
                  decode_batch_size: Optional[int] = None) -> Tensor:
    """Images (B, 3, H, W) in [0, 1], float32, for raw labels (B,): `sample` without the tokens."""
    return sample(generator, tokenizer, class_ids, options, decode_batch_size)[1].float()


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
    "DEFAULT_GUIDANCE_WINDOW",
    "GUIDANCE_SCHEDULES",
    "Guidance",
    "Progress",
    "SamplingOptions",
    "cfg_scale_at",
    "decode_in_batches",
    "effective_precision",
    "filter_logits",
    "generate",
    "generate_tokens",
    "register_guidance_schedule",
    "sample",
    "sample_images",
    "sample_images_seeded",
    "sample_next_token",
    "to_uint8",
    "why_not_fast",
]
