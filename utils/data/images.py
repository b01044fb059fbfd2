"""Image pre-processing for ImageNet: ADM's center crop and RAR's ten crops (pre-tokenization), the original's
training transform (on-the-fly shards), to tensors in [0, 1]."""

from __future__ import annotations

import io
import os
import re
from typing import List

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from utils.errors import DataError


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: halve with BOX while the short side >= 2·size, BICUBIC-resize the short side to
    `size`, then crop the center size×size."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float (3, H, W) in [0, 1] (the tokenizers' input range)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_problem(err: BaseException) -> str:
    """What a decoder said about bad image bytes, without the address of the in-memory file it names (so that
    the same member met twice gives the same message, warned about once)."""
    return f"{type(err).__name__}: {re.sub(r' <[^>]* at 0x[0-9a-f]+>', '', str(err))}"


def five_crops(image: Image.Image, size: int) -> List[Image.Image]:
    """The four corner crops and the center crop of size×size, in torchvision's `five_crop` order."""
    w, h = image.size
    center = (int(round((w - size) / 2.0)), int(round((h - size) / 2.0)))
    corners = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), center]
    return [image.crop((x, y, x + size, y + size)) for x, y in corners]


def ten_crops(image: Image.Image, size: int) -> List[Image.Image]:
    """LlamaGen's / RAR's ten-crop augmentation (torchvision's `TenCrop` after an ADM center crop to
    int(1.1·size)): the five crops of the image, then the five crops of its mirror image."""
    image = center_crop_arr(image, int(size * 1.1))
    return five_crops(image, size) + five_crops(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size)


def training_transform(preprocessing) -> transforms.Compose:
    """The original release's on-the-fly training transform for WebDataset images (`dataset.preprocessing`):
    resize the shorter edge to `resize_shorter_edge` (bicubic, antialiased), crop `crop_size` at the center (or at
    random with `random_crop`), flip at random with `random_flip`, to a tensor in [0, 1]. Pre-tokenization keeps
    RAR's procedure instead (ADM center crop / ten crops, `scripts/pretokenization.py`)."""
    size = preprocessing.crop_size
    steps = [
        transforms.Resize(preprocessing.resize_shorter_edge, interpolation=InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomCrop(size) if preprocessing.random_crop else transforms.CenterCrop(size),
    ]
    if preprocessing.random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.ToTensor()])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under root/<class>/, classes sorted by name (ImageNet's synset order gives
    the standard labels 0..999), files sorted within a class."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    items = [
        (os.path.join(root, name, file), label)
        for label, name in enumerate(classes)
        for file in sorted(os.listdir(os.path.join(root, name)))
        if file.lower().endswith(IMAGE_EXTENSIONS)
    ]
    return items, classes
