"""One optimizer step of training, and the accelerator it runs under (processes, precision, trackers).

`train_step` is the step `scripts/train_rear.py` runs and `scripts/benchmark.py` times: gradient accumulation over
micro-batches (DDP synchronises only the last), the objective under autocast, clipping, AdamW, the lr schedule.
It never reads a value back to the host unless asked to (`parameter_norms`), so the GPU is never waited for.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta
from typing import Callable, Dict, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from utils.training.logging import mean_terms, parameter_grad_norms


def make_accelerator(config, tracker: Optional[str] = None, logging_dir: Optional[str] = None) -> Accelerator:
    """DDP over every process `accelerate launch` / `torchrun` started (gloo on CPUs), with the config's precision
    and tracker. The process-group timeout is long because the main process converts a pre-tokenized JSONL file
    (minutes for ImageNet's 12.8M lines) while the others wait."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = config.training.enable_tf32
        torch.backends.cudnn.allow_tf32 = config.training.enable_tf32
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, processes on CPUs would not form a (gloo) group
        mixed_precision=str(config.training.mixed_precision),
        log_with=tracker,
        project_dir=logging_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))],
    )


def batch_tokens(batch: Dict[str, torch.Tensor], tokenizer, device, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, class_ids) on `device`, the first `length` tokens of each image (all of them but for a generator
    over a prefix of ReTok's); image batches are tokenized here by the frozen tokenizer."""
    class_ids = batch["class_ids"].to(device, non_blocking=True)
    if "tokens" in batch:
        return batch["tokens"][:, :length].to(device, non_blocking=True).long(), class_ids
    with torch.no_grad():
        return tokenizer.encode(batch["images"].to(device, non_blocking=True))[:, :length], class_ids


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    objective: Callable,
    next_batch: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    accumulation: int = 1,
    max_grad_norm: float = float("inf"),
    parameter_norms: bool = False,
) -> Tuple[Dict[str, torch.Tensor], float, Dict[str, float]]:
    """One optimizer step at schedule step `step` over `accumulation` micro-batches from `next_batch()`.

    Returns the logged terms (device tensors: the mean over the micro-batches, and `grad_norm` before clipping),
    the learning rate the update used, and, if `parameter_norms`, every parameter's gradient norm after clipping.
    """
    terms = []
    for micro in range(accumulation):
        tokens, class_ids = next_batch()
        with nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model):
            with accelerator.autocast():
                parts = objective(model, tokens, class_ids, step)
            accelerator.backward(parts.loss / accumulation)
        terms.append(parts.terms())
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    norms = parameter_grad_norms(accelerator.unwrap_model(model)) if parameter_norms else {}
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**mean_terms(terms), "grad_norm": grad_norm}, lr, norms
