"""A run folder describes itself, and keeps describing the model it holds.

Its `config.yaml` records every setting of the run and names the run's own weights (`generator.safetensors`, and
`tokenizer.safetensors` for a tokenizer fitted at start-up) relative to the folder, so `config=RUN/config.yaml`
alone serves the sampler, the demo and the measurements, wherever the folder has moved. Training into a folder that
holds a run continues that run: a setting that makes the model what it is (`utils.config.MODEL_SETTINGS`) must be
the recorded one, and a last step below the step already reached is refused too, in one line and before anything
on disk changes. What may change on a resume (`utils.config.RESUMABLE_SETTINGS`) is written into the new record.
"""

from __future__ import annotations

import copy
import os

from omegaconf import DictConfig

from utils.config import merged_config, model_settings, paths_for_folder, to_yaml
from utils.errors import OutputError
from utils.files import atomic_open, changed_settings
from utils.training.resume import CHECKPOINT_PATTERN, list_checkpoints

CONFIG = "config.yaml"
GENERATOR = "generator.safetensors"
TOKENIZER = "tokenizer.safetensors"
SAMPLES = "eval_samples"  # the sampler's folder (SAMPLES.npz) in a run folder


def run_config(config: DictConfig, out: str, fitted_tokenizer: bool) -> DictConfig:
    """`config` as the run folder `out` records it: naming the run's generator weights (and its fitted tokenizer's),
    with paths inside the folder relative to it."""
    named = copy.deepcopy(config)
    named.experiment.generator_checkpoint = os.path.join(out, GENERATOR)
    if fitted_tokenizer:
        named.experiment.tokenizer_checkpoint = os.path.join(out, TOKENIZER)
    return paths_for_folder(named, out)


def reached_step(out: str) -> int:
    """The step of the newest checkpoint folder in `out` (0 without one)."""
    newest = list_checkpoints(out)[-1:]
    return int(CHECKPOINT_PATTERN.match(os.path.basename(newest[0])).group(1)) if newest else 0


def check_same_run(out: str, record: DictConfig) -> None:
    """Refuse to train `record` (a `run_config`) into `out` if the run there is another model, or has gone past the
    last step asked for now. Reads only: nothing on disk changes."""
    path = os.path.join(out, CONFIG)
    if not os.path.isfile(path):
        return
    recorded = paths_for_folder(merged_config(path), out)  # a record of another version: its paths as ours are
    changes = changed_settings(model_settings(recorded), model_settings(record))
    if changes:
        raise OutputError(
            f"{out} holds a run of another model ({changes}): resuming it with these settings would relabel its "
            "weights; train into another experiment.output_dir, or rerun with the recorded values "
            "(what may change on a resume: docs/training.md#resuming-and-changing-settings)"
        )
    t, step = record.training, reached_step(out)
    last_step = min(t.max_train_steps, t.stop_steps or t.max_train_steps)
    if last_step < step:
        key = "training.stop_steps" if t.stop_steps and t.stop_steps < t.max_train_steps else "training.max_train_steps"
        raise OutputError(f"{out} holds a run at step {step}, past {key}={last_step}: its config would record fewer "
                          f"steps than its weights have; ask for {step} or more, or train into another "
                          "experiment.output_dir")


def samples_folder(output_dir: str) -> str:
    """The sampler's DIR for `experiment.output_dir`: that folder, or in a run folder (the run's own config names it)
    its `eval_samples/` (so `DIR.npz` is `RUN/eval_samples.npz`), beside the run's measurements."""
    return os.path.join(output_dir, SAMPLES) if os.path.isfile(os.path.join(output_dir, CONFIG)) else output_dir


def write_run_config(out: str, record: DictConfig) -> None:
    with atomic_open(os.path.join(out, CONFIG)) as f:
        f.write(to_yaml(record))


__all__ = ["CONFIG", "GENERATOR", "SAMPLES", "TOKENIZER", "check_same_run", "reached_step", "run_config",
           "samples_folder", "write_run_config"]
