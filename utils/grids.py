"""Sample grids: plain (torchvision's `make_grid`), captioned per image (the demo) or per row (the toy run), and
the ImageNet class names to caption them with (torchvision's list, the standard label order)."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import List, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from utils.data.toy import TOY_CLASS_NAMES
from utils.files import atomic_path


@lru_cache(maxsize=1)
def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in label order, as torchvision ships them with its classifiers' weights."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_caption(class_id: int, num_classes: int) -> str:
    """'282 tiger cat' for ImageNet's 1000 classes, 'class 3' for any other label set."""
    if num_classes == 1000:
        return f"{class_id} {imagenet_class_names()[class_id]}"
    return f"class {class_id}"


def class_names(config) -> List[str]:
    """The caption of every class of a config's generator: ImageNet's names, the toy set's, else 'class 3'."""
    num_classes = config.model.generator.condition_num_classes
    if config.dataset.name == "toy" and num_classes <= len(TOY_CLASS_NAMES):
        return TOY_CLASS_NAMES[:num_classes]
    return [class_caption(c, num_classes) for c in range(num_classes)]


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] → one uint8 (rows·H, columns·W, 3) array, row-major; a short last row is black."""
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=columns, padding=0)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def save_png(image: Union[np.ndarray, Image.Image], path: str, scale: int = 1) -> None:
    """Write a uint8 (H, W, 3) array or a PIL image as PNG (atomically), enlarged `scale` times (nearest)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _font_and_height():
    font = ImageFont.load_default()
    return font, font.getbbox("Ag")[3] + 6


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-1]
    return text


def labelled_grid(images: np.ndarray, captions: Sequence[str], columns: int = 8, min_size: int = 128) -> Image.Image:
    """uint8 images (B, H, W, 3) in rows of `columns`, each above its caption. Images smaller than `min_size` are
    enlarged by an integer factor (nearest neighbour, so pixels stay exact) to leave room for the caption.
    (Our own: torchvision's grids have no captions.)"""
    count, height, width = images.shape[:3]
    scale = max(1, math.ceil(min_size / width))
    cell_w, cell_h = width * scale, height * scale
    font, text_h = _font_and_height()
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell_h + 3), _fit(draw, caption, font, cell_w), fill="black", font=font)
    return grid


def labelled_rows(images: torch.Tensor, row_captions: Sequence[str], columns: int, scale: int = 1,
                  caption_width: int = 96) -> Image.Image:
    """(B, 3, H, W) in [0, 1] in rows of `columns` (`image_grid`), enlarged `scale` times, with each row's caption
    in a white margin on the left. (Our own: torchvision's grids have no captions.)"""
    pixels = Image.fromarray(image_grid(images, columns))
    pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.Resampling.NEAREST)
    row_h = images.shape[2] * scale
    font, text_h = _font_and_height()
    canvas = Image.new("RGB", (caption_width + pixels.width, pixels.height), "white")
    canvas.paste(pixels, (caption_width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, caption in enumerate(row_captions):
        draw.text((2, row * row_h + max(0, (row_h - text_h) // 2)), _fit(draw, caption, font, caption_width),
                  fill="black", font=font)
    return canvas


__all__ = ["class_caption", "class_names", "image_grid", "imagenet_class_names", "labelled_grid", "labelled_rows", "save_png"]
