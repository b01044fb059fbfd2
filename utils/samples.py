"""Sample grids during and after training, and the toy run's end-to-end score."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from utils.sampling import SamplingOptions, generate_tokens
from utils.toy_data import ToyClassifier, toy_images


@torch.no_grad()
def generate_images(generator, tokenizer, class_ids: Tensor, config, seed: int, batch_size: int = 256) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] for `class_ids`, sampled in eval mode from `seed`.

    The global random state is forked, so sampling in the middle of training leaves the training stream (and
    so an exact resume) untouched.
    """
    devices = [class_ids.device] if class_ids.device.type == "cuda" else []
    options = SamplingOptions.from_config(config)
    was_training = generator.training
    generator.eval()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        images = [
            tokenizer.decode_tokens(generate_tokens(generator, chunk, options)).float()
            for chunk in class_ids.split(batch_size)
        ]
    generator.train(was_training)
    return torch.cat(images)


def image_grid(images: Tensor, columns: int) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] → one uint8 (rows·H, columns·W, 3) array, row-major; a short last row is black."""
    b, c, h, w = images.shape
    rows = math.ceil(b / columns)
    padded = torch.zeros(rows * columns, c, h, w)
    padded[:b] = images.detach().float().cpu().clamp(0, 1)
    grid = padded.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    return (grid * 255).round().to(torch.uint8).numpy()


def save_png(array: np.ndarray, path: str, scale: int = 1) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path)


def grid_classes(num_classes: int, count: int) -> Tensor:
    """`count` classes spread evenly over [0, num_classes) (all of them when count >= num_classes)."""
    count = min(count, num_classes)
    return torch.linspace(0, num_classes - 1, count).round().long()


def toy_class_share(images: Tensor, class_ids: Tensor, config) -> float:
    """Share of `images` that a classifier fitted on fresh toy images assigns to the requested class."""
    toy = config.dataset.toy
    train_images, labels = toy_images(4000, toy.num_classes, toy.image_size, seed=toy.seed + 1)
    classifier = ToyClassifier.fit(train_images, labels, toy.num_classes)
    return classifier.share_correct(images.cpu(), class_ids.cpu())
