"""reAR's training objective: next-token cross-entropy plus the two generator–tokenizer consistency
regularisers of the paper (§2 of SPEC.md), and RAR's randomized-order option.

- Noisy context: the *input* tokens are corrupted at a per-sample rate u·r(step), u ~ U(0, 1); targets stay
  clean, so the generator learns to continue from imperfect prefixes like the ones it produces at inference.
- Codebook-embedding alignment: hidden states of an early block are pulled towards the codebook vector of
  the token they *read* (encode), those of a late block towards the token they *predict* (decode).
Every piece is a small function so that the training loop reads as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.rear import GeneratorOutput

PERTURB_MODES = ("switch", "mask", "none")
ORDERS = ("raster", "random")


def randomness_ratio(step: int, start: int, end: int) -> float:
    """r(step): 1 before `start`, 0 after `end`, linear from 1 to 0 in between."""
    if step <= start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)


def drop_class_labels(class_ids: Tensor, probability: float, null_class: int) -> Tensor:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    drop = torch.rand(class_ids.shape, device=class_ids.device) < probability
    return torch.where(drop, torch.full_like(class_ids, null_class), class_ids)


def noisy_context(
    tokens: Tensor, ratio: float, mode: str, codebook_size: int
) -> tuple[Tensor, Tensor]:
    """Corrupt each input token with probability u_b·ratio, u_b ~ U(0, 1) per sample.

    `switch` puts a uniform random token in [0, V) in its place, `mask` the mask token V.
    Returns the corrupted tokens and the boolean noise mask (B, N).
    """
    if mode not in PERTURB_MODES:
        raise ValueError(f"perturb_mode must be one of {PERTURB_MODES}, got {mode!r}")
    if mode == "none" or ratio <= 0:
        return tokens, torch.zeros_like(tokens, dtype=torch.bool)
    rate = torch.rand(tokens.shape[0], 1, device=tokens.device) * ratio
    noise = torch.rand(tokens.shape, device=tokens.device) < rate
    if mode == "switch":
        replacement = torch.randint_like(tokens, codebook_size)
    else:
        replacement = torch.full_like(tokens, codebook_size)
    return torch.where(noise, replacement, tokens), noise


def random_orders(batch: int, length: int, ratio: float, device=None) -> Tensor:
    """RAR: each sample's generation order is a random permutation with probability `ratio`, else raster."""
    raster = torch.arange(length, device=device).expand(batch, length)
    permuted = torch.rand(batch, length, device=device).argsort(dim=1)
    shuffled = torch.rand(batch, 1, device=device) < ratio
    return torch.where(shuffled, permuted, raster)


def alignment_loss(hidden: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean of −cos(hidden, target) over all (b, i); positions with weight 0 count as 0 in the mean."""
    negative_cosine = -F.cosine_similarity(hidden.float(), target.float(), dim=-1)
    if weight is not None:
        negative_cosine = negative_cosine * weight
    return negative_cosine.mean()


@dataclass
class LossParts:
    loss: Tensor
    ce: Tensor
    encode_alignment: Tensor
    decode_alignment: Tensor
    accuracy: Tensor  # share of positions whose argmax is the target token


def rear_loss(
    output: GeneratorOutput,
    targets: Tensor,
    codebook_features: Optional[Tensor] = None,
    noise_mask: Optional[Tensor] = None,
    alignment_weight: float = 1.0,
) -> LossParts:
    """CE(logits, clean targets) + alignment_weight · (encode + decode alignment).

    `codebook_features` (B, N, z) are the tokenizer's codebook vectors of the clean targets; without them
    (or without alignment heads) the loss is the plain AR cross-entropy.
    """
    logits = output.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    zero = ce.new_zeros(())
    encode = decode = zero
    if output.encode_z is not None and codebook_features is not None:
        n = targets.shape[1]
        keep = None if noise_mask is None else 1.0 - noise_mask.float()
        # encode: positions 2..N+1 read tok_0..tok_{N-1}; corrupted inputs are not aligned
        encode = alignment_loss(output.encode_z[:, 2 : n + 2], codebook_features, keep)
        # decode: positions 1..N predict tok_0..tok_{N-1}
        decode = alignment_loss(output.decode_z[:, 1 : n + 1], codebook_features)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return LossParts(ce + alignment_weight * (encode + decode), ce, encode, decode, accuracy)
