"""Sampling for the scripts: the settings of a run (`SamplingOptions`), the one call site of the samplers
(`generate_tokens`, `sample`), and the images they decode to.

Two samplers draw the tokens, through the per-token primitives of `modeling/next_token.py` (guidance schedules,
filtering, the draw): the readable loop every backbone shares (`Generator.generate`: what differs between the
originals' samplers is the backbone's, so one loop draws each original's tokens for a fixed seed) and the fast one
(`modeling/fast_sampler.py`: static cache, CUDA graph). `generate_tokens` picks the fast sampler where it serves the
backbone and the settings (`why_not_fast`), else the loop. Imports run one way: next_token <- generator <- rear <-
fast_sampler <- sampler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from modeling.fast_sampler import FastSampler
from modeling.next_token import DEFAULT_GUIDANCE_WINDOW, Progress, cfg_scale_at, filter_logits  # noqa: F401
# (cfg_scale_at and filter_logits: re-exported)


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


def fast_sampler_for(model: nn.Module, batch_size: int, guidance: bool, precision: str) -> FastSampler:
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
    "SamplingOptions",
    "cfg_scale_at",
    "decode_in_batches",
    "effective_precision",
    "filter_logits",
    "generate_tokens",
    "sample",
    "sample_images",
    "sample_images_seeded",
    "to_uint8",
    "why_not_fast",
]
