"""The pieces of a training step: the accelerator (processes, precision) and reAR's objective for one batch.

The objective at optimizer step t (SPEC §2): drop class labels to the null class with `class_label_dropout`;
corrupt the input tokens at rate u·r(t) (noisy context) or, for RAR (`order: random`), permute each sample's
order with probability r(t); then CE on the clean targets plus the codebook-embedding alignment against the
tokenizer's codebook vectors of the clean tokens.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Dict, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from modeling.losses import LossParts, drop_class_labels, noisy_context, random_orders, randomness_ratio, rear_loss
from modeling.rear import shuffle

# fp16 is left out: its loss scaler skips steps with infinite gradients, which the non-finite stop would halt on.
PRECISIONS = ("bf16", "no")


def make_accelerator(config) -> Accelerator:
    """DDP over every process `accelerate launch` / `torchrun` started (gloo on CPUs), with the config's precision.

    The process-group timeout is long because the main process converts a pre-tokenized JSONL file (minutes for
    ImageNet's 12.8M lines) while the others wait.
    """
    precision = config.training.mixed_precision
    if precision not in PRECISIONS:
        raise ValueError(f"training.mixed_precision must be one of {PRECISIONS}, got '{precision}'")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = config.training.enable_tf32
        torch.backends.cudnn.allow_tf32 = config.training.enable_tf32
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, processes on CPUs would not form a (gloo) group
        mixed_precision=precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))],
    )


def batch_tokens(batch: Dict[str, torch.Tensor], tokenizer, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, class_ids) on `device`; image batches are tokenized here by the frozen tokenizer."""
    class_ids = batch["class_ids"].to(device, non_blocking=True)
    if "tokens" in batch:
        return batch["tokens"].to(device, non_blocking=True), class_ids
    with torch.no_grad():
        return tokenizer.encode(batch["images"].to(device, non_blocking=True)), class_ids


def rear_objective(model, tokenizer, tokens: torch.Tensor, class_ids: torch.Tensor, step: int, config) -> LossParts:
    """reAR's training loss for one batch at optimizer step `step` (the model in train mode)."""
    g = config.model.generator
    ratio = randomness_ratio(step, g.randomness_anneal_start, g.randomness_anneal_end)
    class_ids = drop_class_labels(class_ids, g.class_label_dropout, null_class=g.condition_num_classes)
    inputs, noise = noisy_context(tokens, ratio, g.perturb_mode, config.model.vq_model.codebook_size)
    features = tokenizer.get_quantized_states(tokens) if g.transition_alignment else None
    orders = None
    if g.order == "random":  # RAR: targets, features and the noise mask follow each sample's order
        orders = random_orders(*tokens.shape, ratio, device=tokens.device)
        tokens, noise = shuffle(tokens, orders), shuffle(noise, orders)
        features = None if features is None else shuffle(features, orders)
    elif g.order != "raster":
        raise ValueError(f"model.generator.order must be 'raster' or 'random', got '{g.order}'")
    output = model(inputs, class_ids, orders=orders)
    return rear_loss(output, tokens, features, noise, g.transition_alignment_weight)
