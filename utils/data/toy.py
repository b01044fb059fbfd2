"""The built-in toy data set: class-conditional images of coloured shapes, drawn from a seed (nothing to download).

Ten classes, each a (shape, colour) pair: five shapes in two colours, so that neither colour nor shape alone
names the class. Every image jitters the position, size and colour of its shape and the background shade.
`ToyClassifier` (logistic regression on the pixels) scores how many generated samples show the class that was
asked for: the end-to-end check of the CPU training run.
"""

from __future__ import annotations

import itertools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = ("disk", "square", "triangle", "cross", "ring")
COLOURS = ((0.95, 0.25, 0.15), (0.20, 0.55, 0.95))  # red, blue
COLOUR_NAMES = ("red", "blue")
MAX_CLASSES = len(SHAPES) * len(COLOURS)
HELD_OUT_SEED_OFFSET = 100  # held-out images: seed dataset.toy.seed + this (training draws from dataset.toy.seed)
TOY_CLASS_NAMES = [f"{c} {COLOUR_NAMES[c // len(SHAPES)]} {SHAPES[c % len(SHAPES)]}" for c in range(MAX_CLASSES)]


def shape_mask(shape: str, y: Tensor, x: Tensor, radius: Tensor) -> Tensor:
    """Boolean mask of `shape` centred at 0 on the pixel grid (y, x), per image `radius` (B, 1, 1)."""
    if shape == "disk":
        return y**2 + x**2 <= radius**2
    if shape == "square":
        return (y.abs() <= radius * 0.8) & (x.abs() <= radius * 0.8)
    if shape == "triangle":  # apex up, base at y = +0.7r
        return (y <= radius * 0.7) & (x.abs() <= (y + radius) * 0.6)
    if shape == "cross":
        arm = radius * 0.3
        return ((y.abs() <= arm) & (x.abs() <= radius)) | ((x.abs() <= arm) & (y.abs() <= radius))
    if shape == "ring":
        d2 = y**2 + x**2
        return (d2 <= radius**2) & (d2 >= (radius * 0.55) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def toy_images(num_images: int, num_classes: int = MAX_CLASSES, size: int = 32, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """`num_images` images (N, 3, size, size) float in [0, 1] and their labels (N,), the same for the same seed."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the toy data set has at most {MAX_CLASSES} classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % num_classes
    labels = labels[torch.randperm(num_images, generator=g)]
    centre = size / 2 - 0.5 + (torch.rand(num_images, 2, 1, 1, generator=g) - 0.5) * size * 0.2
    radius = size * (0.26 + 0.08 * torch.rand(num_images, 1, 1, generator=g))
    grid = torch.arange(size, dtype=torch.float32)
    y = grid.view(1, size, 1) - centre[:, 0]
    x = grid.view(1, 1, size) - centre[:, 1]
    background = 0.1 + 0.15 * torch.rand(num_images, 1, 1, 1, generator=g)
    brightness = 0.8 + 0.2 * torch.rand(num_images, 1, 1, 1, generator=g)
    images = background.expand(num_images, 3, size, size).clone()
    for label in range(num_classes):
        chosen = labels == label
        shape, colour = SHAPES[label % len(SHAPES)], COLOURS[label // len(SHAPES)]
        mask = shape_mask(shape, y[chosen], x[chosen], radius[chosen])[:, None]
        fill = torch.tensor(colour).view(1, 3, 1, 1) * brightness[chosen]
        images[chosen] = torch.where(mask, fill, images[chosen])
    return images.clamp(0, 1), labels


class ToyClassifier:
    """Multinomial logistic regression on 2×2-pooled pixels, fitted on toy images (full-batch L-BFGS, seconds):
    names the class a generated image shows. Nearest class mean is not enough here: it confuses shapes that
    the position jitter smears out."""

    def __init__(self, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    @staticmethod
    def features(images: Tensor) -> Tensor:
        return F.avg_pool2d(images.float(), 2).flatten(1)

    @classmethod
    def fit(cls, images: Tensor, labels: Tensor, num_classes: int, iterations: int = 30) -> "ToyClassifier":
        x = cls.features(images)
        mean, std = x.mean(0), x.std(0) + 1e-3
        x = (x - mean) / std
        weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, history_size=10)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, labels) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return cls(mean, std, weight.detach(), bias.detach())

    def predict(self, images: Tensor) -> Tensor:
        return (((self.features(images) - self.mean) / self.std) @ self.weight + self.bias).argmax(dim=1)

    def share_correct(self, images: Tensor, labels: Tensor) -> float:
        """Share of `images` assigned to their `labels`."""
        return (self.predict(images) == labels).float().mean().item()


def module_device(module) -> torch.device:
    """Where a module's tensors are: its parameters' or, for one whose state is all buffers, its buffers' (the CPU
    for a module with neither)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.no_grad()
def encode_images(tokenizer, images: Tensor, batch_size: int = 4096) -> Tensor:
    """Tokens (N, L) on the CPU of CPU images (N, 3, H, W), encoded in batches on the tokenizer's device."""
    device = module_device(tokenizer)
    return torch.cat([tokenizer.encode(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


def tokenizer_fit_images(config) -> Tensor:
    """The toy images the toy tokenizer is fitted on (the same for the same `dataset.toy`)."""
    toy = config.dataset.toy
    return toy_images(min(toy.num_images, 1000), toy.num_classes, toy.image_size, toy.seed)[0]


def toy_class_share(images: Tensor, class_ids: Tensor, config) -> float:
    """Share of `images` that a classifier fitted on fresh toy images assigns to the requested class."""
    toy = config.dataset.toy
    train_images, labels = toy_images(4000, toy.num_classes, toy.image_size, seed=toy.seed + 1)
    classifier = ToyClassifier.fit(train_images, labels, toy.num_classes)
    return classifier.share_correct(images.cpu(), class_ids.cpu())
