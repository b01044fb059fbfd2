"""A labelled grid of samples, and the ImageNet class names to label them with."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The 1000 ImageNet-1k class names in label order, as torchvision ships them (`torchvision.models._meta`).
IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")


@lru_cache(maxsize=1)
def imagenet_class_names() -> List[str]:
    names = IMAGENET_CLASSES_FILE.read_text().splitlines()
    if len(names) != 1000:
        raise ValueError(f"{IMAGENET_CLASSES_FILE} has {len(names)} names, expected 1000")
    return names


def class_caption(class_id: int, num_classes: int) -> str:
    """'282 tiger cat' for ImageNet's 1000 classes, 'class 3' for any other label set."""
    if num_classes == 1000:
        return f"{class_id} {imagenet_class_names()[class_id]}"
    return f"class {class_id}"


def labelled_grid(images: np.ndarray, captions: Sequence[str], columns: int = 8, min_size: int = 128) -> Image.Image:
    """uint8 images (B, H, W, 3) in rows of `columns`, each above its caption. Images smaller than `min_size` are
    enlarged by an integer factor (nearest neighbour, so pixels stay exact) to leave room for the caption."""
    count, height, width = images.shape[:3]
    scale = max(1, math.ceil(min_size / width))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    text_h = font.getbbox("Ag")[3] + 6
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        while caption and draw.textlength(caption, font=font) > cell_w - 4:
            caption = caption[:-1]
        draw.text((x + 2, y + cell_h + 3), caption, fill="black", font=font)
    return grid


__all__ = ["class_caption", "imagenet_class_names", "labelled_grid"]
