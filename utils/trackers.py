"""Where training metrics and sample grids go: Weights & Biases, TensorBoard, or nowhere (experiment.tracker).

Only the main process logs; the others get a `NullTracker`.
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np
from omegaconf import OmegaConf

TRACKERS = ("wandb", "tensorboard", "none")


class NullTracker:
    def log(self, values: Dict[str, float], step: int) -> None:
        pass

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, name, image, step):
        self.writer.add_image(name, image, step, dataformats="HWC")

    def finish(self):
        self.writer.close()


class WandbTracker(NullTracker):
    """A resumed run logs into the same wandb run: its id is kept in OUTPUT_DIR/wandb_run_id."""

    def __init__(self, config, output_dir: str):
        try:
            import wandb
        except ImportError:
            raise ImportError("experiment.tracker=wandb needs `pip install wandb` (or tensorboard / none)") from None
        id_file = os.path.join(output_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
        with open(id_file, "w") as f:
            f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(
            project=config.experiment.project,
            name=config.experiment.name,
            id=run_id,
            resume="allow",
            dir=output_dir,
            config=OmegaConf.to_container(config, resolve=True),
        )

    def log(self, values, step):
        self.run.log(values, step=step)

    def log_image(self, name, image, step):
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def finish(self):
        self.run.finish()


def build_tracker(config, output_dir: str, is_main: bool):
    kind = "wandb" if config.training.enable_wandb else config.experiment.tracker
    if kind not in TRACKERS:
        raise ValueError(f"experiment.tracker must be one of {TRACKERS}, got '{kind}'")
    if not is_main or kind == "none":
        return NullTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(config.experiment.logging_dir or os.path.join(output_dir, "logs"))
    return WandbTracker(config, output_dir)
