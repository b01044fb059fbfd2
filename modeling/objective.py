"""reAR's training objective: next-token cross-entropy plus the paper's two generator–tokenizer consistency
regularisers, written once for every backbone and tokenizer (arXiv 2510.04450, §3).

- Noisy context: the *input* tokens are corrupted at a per-sample rate u·r(step), u ~ U(0, 1), r annealed from 1
  to 0; the targets stay clean, so the generator learns to continue from imperfect prefixes like its own samples.
- Codebook-embedding alignment: two small MLP heads on the backbone's hidden states are pulled (−cos) towards the
  tokenizer's codebook vector of a token: the encode head on an early block at the position that *reads* tok_i, the
  decode head on a late block at the position that *predicts* tok_i.
- RAR's randomized order (`order: random`, the baseline of the same codebase): with probability r(step) a sample's
  tokens and positions are permuted.

`Objective(config, tokenizer)(model, tokens, class_ids, step)` is one training micro-batch at optimizer step
`step`; training, the benchmark and the tests all call it. The random draws happen in the original's order, so the
same seed gives the original's stream (also when r = 0: the original still draws its noise there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISE_MODES = ("switch", "mask")


# ----------------------------------------------------------------------------------------- the schedule
def randomness_ratio(step: int, start: int, end: int) -> float:
    """r(step): 1 before `start`, 0 after `end`, linear from 1 to 0 in between."""
    if step <= start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)


# ----------------------------------------------------------------------------------------- the inputs
def drop_class_labels(class_ids: Tensor, probability: float, null_class: int) -> Tensor:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    drop = torch.rand(class_ids.shape, device=class_ids.device) < probability
    return torch.where(drop, torch.full_like(class_ids, null_class), class_ids)


def noisy_context(tokens: Tensor, ratio: float, mode: str, codebook_size: int) -> Tuple[Tensor, Tensor]:
    """Corrupt each input token with probability u_b·ratio, u_b ~ U(0, 1) per sample.

    `switch` puts a uniform random token in [0, V) in its place, `mask` the mask token V. Returns the corrupted
    tokens and the boolean noise mask (B, N). The draws are made whatever the ratio (0 corrupts nothing), as the
    original does, so that the random stream after this step does not depend on r.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"noisy context mode must be one of {NOISE_MODES}, got {mode!r}")
    rate = torch.rand(tokens.shape[0], 1, device=tokens.device) * ratio
    noise = torch.rand(tokens.shape, device=tokens.device) < rate
    if mode == "switch":
        replacement = torch.randint(0, codebook_size, tokens.shape, device=tokens.device)
    else:
        replacement = torch.full_like(tokens, codebook_size)
    return torch.where(noise, replacement, tokens), noise


def random_orders(batch: int, length: int, ratio: float, device=None) -> Tensor:
    """RAR: each sample's generation order is a random permutation with probability `ratio`, else raster."""
    raster = torch.arange(length, device=device).expand(batch, length)
    permuted = torch.rand(batch, length, device=device).argsort(dim=1)
    shuffled = torch.rand(batch, 1, device=device) < ratio
    return torch.where(shuffled, permuted, raster)


def shuffle(x: Tensor, orders: Tensor) -> Tensor:
    """x (B|1, N, ...) gathered along dim 1 by per-sample orders (B, N)."""
    x = x.expand(orders.shape[0], *x.shape[1:])
    return x[torch.arange(orders.shape[0], device=orders.device)[:, None], orders]


# ----------------------------------------------------------------------------------------- the heads
def alignment_mlp(dim: int, projection_dim: int, z_dim: int) -> nn.Sequential:
    """Linear SiLU Linear SiLU Linear (indices 0, 2, 4: the released state-dict names)."""
    return nn.Sequential(
        nn.Linear(dim, projection_dim),
        nn.SiLU(),
        nn.Linear(projection_dim, projection_dim),
        nn.SiLU(),
        nn.Linear(projection_dim, z_dim),
    )


def add_alignment_heads(model: nn.Module, config) -> Dict[str, int]:
    """Attach reAR's heads to a backbone as `encode_align_mlp` / `decode_align_mlp` (a head switched off is not
    built). Returns {head name: the block whose output it reads}. z defaults to the tokenizer's codebook width."""
    g, vq = config.model.generator, config.model.vq_model
    if not g.transition_alignment:
        return {}
    z_dim = g.z_dim if g.z_dim is not None else vq.token_size
    heads = {}
    for name, enabled, layer in (
        ("encode_align_mlp", g.encode_align, g.encode_align_layer_idx),
        ("decode_align_mlp", g.decode_align, g.decode_align_layer_idx),
    ):
        if enabled:
            if not 0 <= layer < g.num_hidden_layers:
                raise ValueError(f"{name} reads block {layer}, outside the {g.num_hidden_layers} blocks")
            model.add_module(name, alignment_mlp(g.hidden_size, g.projection_dim, z_dim))
            heads[name] = layer
    return heads


def alignment_loss(hidden: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean of −cos(hidden, target) over all (b, i); positions with weight 0 count as 0 in the mean."""
    negative_cosine = -F.cosine_similarity(hidden.float(), target.float(), dim=-1)
    if weight is not None:
        negative_cosine = negative_cosine * weight
    return negative_cosine.mean()


# ----------------------------------------------------------------------------------------- the loss
@dataclass
class LossParts:
    loss: Tensor
    ce: Tensor
    encode_alignment: Tensor
    decode_alignment: Tensor
    accuracy: Tensor  # share of positions whose argmax is the target token

    def terms(self) -> Dict[str, Tensor]:
        """The logged values (detached): total, CE, each alignment term, token accuracy."""
        return {
            "loss": self.loss.detach(),
            "ce": self.ce.detach(),
            "encode_alignment": self.encode_alignment.detach(),
            "decode_alignment": self.decode_alignment.detach(),
            "token_accuracy": self.accuracy.detach(),
        }


def rear_loss(
    output,
    targets: Tensor,
    codebook_features: Optional[Tensor] = None,
    noise_mask: Optional[Tensor] = None,
    alignment_weight: float = 1.0,
) -> LossParts:
    """CE(logits, clean targets) + alignment_weight · (encode + decode alignment).

    `output` is a backbone's `GeneratorOutput`: logits (B, N, V) and the heads' outputs over every position
    (`prefix_len` P: position P+i reads tok_i, P−1+i predicts it). `codebook_features` (B, N, z) are the tokenizer's
    codebook vectors of the clean targets; without them (or without heads) the loss is the plain AR cross-entropy.
    """
    logits = output.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    encode = decode = ce.new_zeros(())
    if codebook_features is not None:
        n, p = targets.shape[1], output.prefix_len
        if output.encode_z is not None:  # corrupted inputs are not aligned
            keep = None if noise_mask is None else 1.0 - noise_mask.float()
            encode = alignment_loss(output.encode_z[:, p : p + n], codebook_features, keep)
        if output.decode_z is not None:
            decode = alignment_loss(output.decode_z[:, p - 1 : p - 1 + n], codebook_features)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return LossParts(ce + alignment_weight * (encode + decode), ce, encode, decode, accuracy)


class Objective:
    """reAR's loss for one micro-batch at optimizer step t, for any backbone (the model in train mode):
    drop class labels to the null class; corrupt the input tokens at rate u·r(t) (noisy context) or, for RAR,
    permute each sample's order with probability r(t); then CE on the clean targets plus the alignment of the
    heads with the tokenizer's codebook vectors of the clean tokens."""

    def __init__(self, config, tokenizer):
        g = config.model.generator
        self.generator_config, self.tokenizer = g, tokenizer
        self.codebook_size = config.model.vq_model.codebook_size

    def ratio(self, step: int) -> float:
        g = self.generator_config
        return randomness_ratio(step, g.randomness_anneal_start, g.randomness_anneal_end)

    def __call__(self, model: nn.Module, tokens: Tensor, class_ids: Tensor, step: int) -> LossParts:
        g, ratio = self.generator_config, self.ratio(step)
        class_ids = drop_class_labels(class_ids, g.class_label_dropout, null_class=g.condition_num_classes)
        inputs, noise = tokens, None
        if g.perturb_mode in NOISE_MODES:
            inputs, noise = noisy_context(tokens, ratio, g.perturb_mode, self.codebook_size)
        features = self.tokenizer.get_quantized_states(tokens) if g.transition_alignment else None
        orders = None
        if g.order == "random":  # RAR: targets, features and the noise mask follow each sample's order
            orders = random_orders(*tokens.shape, ratio, device=tokens.device)
            tokens = shuffle(tokens, orders)
            noise = None if noise is None else shuffle(noise, orders)
            features = None if features is None else shuffle(features, orders)
        output = model(inputs, class_ids, orders=orders) if orders is not None else model(inputs, class_ids)
        return rear_loss(output, tokens, features, noise, g.transition_alignment_weight)


__all__ = [
    "LossParts",
    "Objective",
    "add_alignment_heads",
    "alignment_loss",
    "alignment_mlp",
    "drop_class_labels",
    "noisy_context",
    "random_orders",
    "randomness_ratio",
    "rear_loss",
    "shuffle",
]
