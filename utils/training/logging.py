"""What training reports: metrics summed on the device between logging steps (so the step never waits for the
host), the names they are logged under, and the trackers they go to through `accelerate` (wandb, TensorBoard,
SwanLab).

Every metric is logged under our name and, where the original release logged the same value, under its name too
(`train/loss`, `train/ar_loss`, `train/proj_loss`, `train/correct_tokens`, `lr`, `lr/random_ratio`, ...), so a run
can sit beside an original run in one wandb project.
"""

from __future__ import annotations

import os
import secrets
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from utils.config import to_container
from utils.errors import UsageError
from utils.files import atomic_open

NAMES = ("loss", "ce", "encode_alignment", "decode_alignment", "token_accuracy", "grad_norm")
ORIGINAL_NAMES = {
    "loss": "train/loss",
    "ce": "train/ar_loss",
    "token_accuracy": "train/correct_tokens",
    "lr": "lr",
    "noise_rate": "lr/random_ratio",
    "samples_per_second_per_process": "samples/sec/gpu",
}


@torch.no_grad()
def mean_terms(terms: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The logged terms of one optimizer step: the mean over its gradient-accumulation micro-batches."""
    return {key: torch.stack([t[key].detach().float() for t in terms]).mean() for key in terms[0]}


class MetricWindow:
    """Running sums of the loss terms and the gradient norm, and the first step whose loss or gradient was not
    finite (-1 while none was). Reading them (`averages`) is the only synchronisation."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(NAMES), device=device)
        self.count = 0
        self.first_non_finite = torch.full((), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def add(self, terms: Mapping[str, torch.Tensor], step: int) -> None:
        """One optimizer step's terms (`NAMES`, from `train_step`)."""
        values = torch.stack([terms[name].float() for name in NAMES])
        self.sums += values
        self.count += 1
        # the loss (first) and the gradient norm (last); slices, since a list index would be copied from the host
        bad = ~(torch.isfinite(values[0]) & torch.isfinite(values[-1])) & (self.first_non_finite < 0)
        self.first_non_finite = torch.where(bad, torch.full_like(self.first_non_finite, step), self.first_non_finite)

    def averages(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> Dict[str, float]:
        """The window's averages (after `reduce`, e.g. a mean over processes); starts a new window."""
        values = (reduce(self.sums) / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(NAMES, values))


def with_original_names(metrics: Dict[str, float]) -> Dict[str, float]:
    """`metrics` plus the original release's names for the same values (`train/proj_loss` = encode + decode)."""
    out = dict(metrics)
    out.update({original: metrics[ours] for ours, original in ORIGINAL_NAMES.items() if ours in metrics})
    if "lr" in metrics:
        out["lr/generator"] = metrics["lr"]
    if "encode_alignment" in metrics:
        out["train/proj_loss"] = metrics["encode_alignment"] + metrics["decode_alignment"]
    return out


@torch.no_grad()
def parameter_grad_norms(model: torch.nn.Module) -> Dict[str, float]:
    """`grad_norm/<name>`: each parameter's gradient norm over its size, as the original logs them."""
    return {f"grad_norm/{name}": (p.grad.norm(2) / p.grad.numel()).item()
            for name, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------- trackers
def tracker_name(config) -> Optional[str]:
    """The tracker of a run: the original's switches first (`enable_swanlab`, then `enable_wandb`), else
    `experiment.tracker`; None for no tracker. A tracker whose package is missing stops the run at start-up."""
    t = config.training
    name = "swanlab" if t.enable_swanlab else "wandb" if t.enable_wandb else str(config.experiment.tracker)
    if name == "none":
        return None
    package = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard"}[name]
    try:
        __import__(package)
    except ImportError:
        switch = {"wandb": "training.enable_wandb=False", "swanlab": "training.enable_swanlab=False"}.get(name, "")
        raise UsageError(
            f"logging to {name} needs the `{package}` package: `pip install {package}`, or choose another tracker "
            f"(experiment.tracker=tensorboard|none{', ' + switch if switch else ''})"
        ) from None
    return name


def flat_scalars(config) -> Dict[str, object]:
    """The config as {dotted key: scalar} (TensorBoard's hyper-parameters take scalars only)."""
    rows: Dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                rows[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk(to_container(config), "")
    return rows


def start_trackers(accelerator, config, name: Optional[str], output_dir: str) -> None:
    """`accelerator.init_trackers` with the run's name, entity and config. A resumed run logs into the same wandb
    run: its id is kept in OUTPUT_DIR/wandb_run_id."""
    if name is None:
        return
    e = config.experiment
    init_kwargs: Dict[str, dict] = {}
    if name == "wandb" and accelerator.is_main_process:
        id_file = os.path.join(output_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else secrets.token_hex(4)
        with atomic_open(id_file) as f:
            f.write(run_id)
        init_kwargs["wandb"] = {"name": e.name, "entity": e.entity, "id": run_id, "resume": "allow", "dir": output_dir}
    elif name == "swanlab":
        init_kwargs["swanlab"] = {"experiment_name": e.name}
    accelerator.init_trackers(e.project, config=flat_scalars(config) if name == "tensorboard" else to_container(config),
                              init_kwargs=init_kwargs)


def log_grid(accelerator, name: Optional[str], grid: np.ndarray, step: int) -> None:
    """A uint8 (H, W, 3) sample grid to the run's tracker."""
    if name is None or not accelerator.is_main_process:
        return
    tracker = accelerator.get_tracker(name, unwrap=False)
    if name == "tensorboard":
        tracker.log_images({"samples": grid[None]}, step=step, dataformats="NHWC")
    else:
        tracker.log_images({"samples": [grid]}, step=step)


__all__: List[str] = [
    "MetricWindow",
    "log_grid",
    "mean_terms",
    "parameter_grad_norms",
    "start_trackers",
    "tracker_name",
    "with_original_names",
]
