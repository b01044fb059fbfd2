"""Input checks shared by the tokenizers."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tokens(tokens: Tensor, codebook_size: int) -> None:
    """An integer (B, N) tensor of ids in [0, codebook_size): a clear error instead of an index error.

    The range is read on the host only for CPU tensors: on a GPU that read would stall the training step, and
    training data is range-checked when it is loaded (an out-of-range id there still fails in the look-up)."""
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor of shape (B, N), got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.numel() == 0 or tokens.device.type != "cpu":
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= codebook_size:
        bad = low if low < 0 else high
        raise ValueError(f"token {bad} is outside the codebook range [0, {codebook_size})")


def check_images(images: Tensor, channels: int, factor: int) -> None:
    """A clear error unless `images` is a float (B, channels, H, W) batch with H and W multiples of `factor`."""
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"images must have shape (B, {channels}, H, W), got {tuple(images.shape)}")
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"image height and width must be multiples of {factor}, got {tuple(images.shape[2:])}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
