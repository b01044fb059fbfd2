"""Sample grids: torchvision's make_grid gives the pixels the project's earlier hand-written grid gave; the toy
run's grid has a caption per row."""

import math

import numpy as np
import torch
from PIL import Image

from utils.data.toy import TOY_CLASS_NAMES
from utils.grids import image_grid, labelled_rows, save_png


def hand_written_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """The project's grid before it used torchvision (commit 83f90a7, utils/samples.py), kept as the reference."""
    b, c, h, w = images.shape
    rows = math.ceil(b / columns)
    padded = torch.zeros(rows * columns, c, h, w)
    padded[:b] = images.detach().float().cpu().clamp(0, 1)
    grid = padded.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    return (grid * 255).round().to(torch.uint8).numpy()


def test_make_grid_equals_the_hand_written_grid():
    torch.manual_seed(0)
    images = torch.rand(7, 3, 5, 6) * 1.2 - 0.1  # a short last row, and values outside [0, 1]
    for columns in (1, 3, 7):
        assert np.array_equal(image_grid(images, columns), hand_written_grid(images, columns))


def test_toy_rows_are_captioned_and_pixels_kept(tmp_path):
    torch.manual_seed(1)
    images = torch.rand(6, 3, 8, 8)
    canvas = labelled_rows(images, TOY_CLASS_NAMES[:2], columns=3, scale=2, caption_width=96)
    pixels = np.asarray(canvas)
    assert pixels.shape == (2 * 16, 96 + 3 * 16, 3)
    enlarged = np.repeat(np.repeat(image_grid(images, 3), 2, axis=0), 2, axis=1)
    assert np.array_equal(pixels[:, 96:], enlarged)
    assert (pixels[:16, :96] < 128).any() and (pixels[16:, :96] < 128).any()  # a caption in each row's margin
    assert TOY_CLASS_NAMES[:2] == ["0 red disk", "1 red square"]
    save_png(canvas, str(tmp_path / "grid.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")), pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
