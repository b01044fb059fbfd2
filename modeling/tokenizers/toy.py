"""A patch k-means tokenizer for the built-in toy data set: fitted in seconds on a CPU, no weights to download.

Each non-overlapping p×p RGB patch is one token: the index of its nearest codebook entry (squared L2), and the
entry itself (3·p·p values) is both the token's decoded pixels and its embedding for the alignment loss.
32×32 images with p = 4 give 8×8 = 64 tokens. The interface is MaskGIT-VQGAN's: `encode`, `decode_tokens`,
`get_quantized_states`, `codebook_size`, `token_size`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Tokenizer


class PatchKMeansTokenizer(Tokenizer):
    """Set `needs_fit` (the builder does, when there are no weights to load) and training fits it."""

    def __init__(self, codebook_size: int, patch_size: int, image_size: int, channels: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.image_size, self.channels = patch_size, image_size, channels
        self.codebook = nn.Parameter(torch.zeros(codebook_size, channels * patch_size**2), requires_grad=False)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def token_size(self) -> int:
        return self.codebook.shape[1]

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def patches(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, N, C·p·p), patches in row-major order, each flattened channel-first."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        b, c, p, side = images.shape[0], self.channels, self.patch_size, self.image_size // self.patch_size
        x = images.float().reshape(b, c, side, p, side, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, side * side, c * p * p)

    @torch.no_grad()
    def fit(self, images: Tensor, iterations: int = 20, seed: int = 0) -> "PatchKMeansTokenizer":
        """Lloyd's k-means on the patches of `images`; an empty cluster is re-seeded with a random patch."""
        data = self.patches(images).reshape(-1, self.token_size)
        g = torch.Generator().manual_seed(seed)
        self.codebook.copy_(data[torch.randperm(len(data), generator=g)[: self.codebook_size]])
        for _ in range(iterations):
            assignment = self.nearest_codes(data)
            counts = torch.bincount(assignment, minlength=self.codebook_size)
            sums = torch.zeros_like(self.codebook).index_add_(0, assignment, data)
            empty = counts == 0
            means = sums / counts.clamp(min=1)[:, None]
            means[empty] = data[torch.randint(len(data), (int(empty.sum()),), generator=g)]
            self.codebook.copy_(means)
        self.needs_fit = False
        return self

    def nearest_codes(self, z: Tensor) -> Tensor:
        distances = z.pow(2).sum(1, keepdim=True) + self.codebook.pow(2).sum(1)[None] - 2 * z @ self.codebook.T
        return distances.argmin(dim=1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] → tokens (B, N)."""
        patches = self.patches(images)
        return self.nearest_codes(patches.reshape(-1, self.token_size)).reshape(patches.shape[:2])

    def codebook_vectors(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.codebook)

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N) → images (B, C, H, W) in [0, 1]."""
        side = math.isqrt(tokens.shape[1])
        if side * self.patch_size != self.image_size:
            raise ValueError(f"{tokens.shape[1]} tokens do not tile a {self.image_size}x{self.image_size} image")
        b, c, p = tokens.shape[0], self.channels, self.patch_size
        patches = self.get_quantized_states(tokens).reshape(b, side, side, c, p, p)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, self.image_size, self.image_size).clamp(0.0, 1.0)
