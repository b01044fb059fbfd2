"""What the consistency and exposure-bias measurements share: per-position means and their bands, the flags and
device of the commands, and the report they write (PREFIX.json, PREFIX.png with per-position curves)."""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.cli import flag_parser, positive_int, torch_device
from utils.files import atomic_path, write_json


# ----------------------------------------------------------------------------------------- means by position
def position_bands(per_position: np.ndarray) -> Dict[str, float]:
    """The means over the first quarter of the positions, the middle half and the last quarter."""
    quarter = len(per_position) // 4
    return {
        "first_quarter": float(per_position[:quarter].mean()),
        "middle_half": float(per_position[quarter : len(per_position) - quarter].mean()),
        "last_quarter": float(per_position[len(per_position) - quarter :].mean()),
    }


class PositionMeans:
    """Means over sequences of per-position values (B, L): summed on the device batch by batch, read once."""

    def __init__(self):
        self.sums: Dict[str, Tensor] = {}
        self.count = 0

    def add(self, **values: Tensor) -> None:
        """One batch: each value is (B, L); every value of a call covers the same B sequences."""
        for name, value in values.items():
            total = value.double().sum(dim=0)
            self.sums[name] = total if name not in self.sums else self.sums[name] + total
        self.count += len(next(iter(values.values())))

    def summary(self, name: str) -> dict:
        """{"mean", "first_quarter", "middle_half", "last_quarter", "by_position": [L values]} of one value."""
        per_position = (self.sums[name] / self.count).cpu().numpy()
        return {"mean": float(per_position.mean()), **position_bands(per_position),
                "by_position": per_position.tolist()}


# ----------------------------------------------------------------------------------------- the command line
def measurement_flags():
    """A flag parser with the flags both measurements take."""
    flags = flag_parser()
    flags.add_argument("--limit", type=positive_int, default=None,
                       help="use this many sequences of each file, evenly spaced (default: all)")
    flags.add_argument("--batch-size", type=positive_int, default=64, help="sequences per batch")
    flags.add_argument("--device", type=torch_device, default=None,
                       help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if there is one)")
    flags.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.png")
    return flags


def add_inception_flags(flags, what: str = "FID / sFID") -> None:
    """--inception-weights and --allow-few-samples, for a command that scores with ADM's metrics."""
    flags.add_argument("--inception-weights", default=None,
                       help="Inception weights file (default: the torch hub cache, downloaded there when online)")
    flags.add_argument("--allow-few-samples", action="store_true",
                       help=f"{what} over fewer images than feature dimensions (2048) anyway")


def resolve_device(name: Optional[str]) -> torch.device:
    """The device --device names (checked when parsed), or CUDA when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------- the report
def new_figure(panels: int):
    """A matplotlib figure of `panels` side-by-side axes (no pyplot: nothing global, no display needed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * panels, 3.8), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


BANDS = ("first quarter", "middle half", "last quarter")  # the regions of `position_bands`


def plot_by_position(axes, curves: Dict[str, Sequence[float]], ylabel: str) -> None:
    """One line per curve over the token positions, with the bands of `position_bands` marked and named."""
    for label, values in curves.items():
        axes.plot(np.arange(len(values)), values, label=label, linewidth=1.2)
    length = len(next(iter(curves.values())))
    edges = (-0.5, length // 4 - 0.5, length - length // 4 - 0.5, length - 0.5)
    for boundary in edges[1:3]:
        axes.axvline(boundary, color="0.8", linewidth=0.8, zorder=0)
    for name, start, end in zip(BANDS, edges, edges[1:]):  # above the plot, in axes coordinates along y
        axes.text((start + end) / 2, 1.01, name, transform=axes.get_xaxis_transform(), ha="center", va="bottom",
                  fontsize=7, color="0.4")
    axes.set_xlabel("token position")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def write_report(prefix: str, results: dict, figure) -> None:
    """PREFIX.json and PREFIX.png, each written atomically; prints where they are."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    write_json(prefix + ".json", results)
    with atomic_path(prefix + ".png") as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    print(f"wrote {prefix}.json and {prefix}.png")


__all__ = ["BANDS", "PositionMeans", "add_inception_flags", "measurement_flags", "new_figure", "plot_by_position",
           "position_bands", "resolve_device", "write_report"]
