"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory `OUTPUT_DIR/checkpoints/checkpoint-<step>/` holding
    model.safetensors       the generator (names as `ReAR.state_dict()`)
    ema.safetensors         the EMA weights, when training.use_ema
    optimizer.pt            AdamW state;  scheduler.pt  the lr schedule;  scaler.pt  the fp16 loss scale, if any
    rng_state_<rank>.pt     python, numpy, torch (and CUDA) generator states of every process
    train_state.json        step, samples consumed (the data position), world size
It is written under a temporary name and renamed when complete, so a crash while saving leaves the previous
checkpoint intact and a half-written one is never mistaken for a checkpoint. With several machines the output
directory must be on a file system they share (every process writes its own RNG state).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.weights import load_checked

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or weight: training stops before anything is written."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> Dict:
    """The global generators of this process, in a form `torch.load(weights_only=True)` reads back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- writing
def check_finite(state_dict: Dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"{what} has non-finite values in {len(bad)} tensors (e.g. {bad[0]}); not saved")


def contiguous(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def fsync_files(directory: str) -> None:
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            os.fsync(f.fileno())


def save_weights(path: str, state_dict: Dict[str, torch.Tensor]) -> None:
    """One `.safetensors` file, written to a temporary name and renamed (finite weights only)."""
    check_finite(state_dict, path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(contiguous(state_dict), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: str,
    step: int,
    train_state: Dict,
    write_shared: Callable[[str], None],
    barrier: Callable[[], None],
    rank: int,
) -> str:
    """Write checkpoint `step` collectively: every rank saves its RNG state, the main rank (0) calls
    `write_shared(directory)` for the model, optimizer, etc., then renames the directory into place."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"checkpoint-{step:08d}")
    tmp = os.path.join(root, f".tmp-checkpoint-{step:08d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
        os.makedirs(tmp)
    barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    barrier()
    if rank == 0:
        write_shared(tmp)
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({**train_state, "step": step}, f, indent=2)
        fsync_files(tmp)
        if os.path.exists(final):  # the same step saved again (a resumed run that ends where it began)
            shutil.rmtree(final)
        os.rename(tmp, final)
    barrier()
    return final


def write_training_state(directory: str, model, optimizer, scheduler, ema=None, scaler=None) -> None:
    """The main rank's part of a checkpoint. Refuses non-finite weights, so a good checkpoint is never replaced
    by a diverged one."""
    weights = model.state_dict()
    check_finite(weights, "the generator")
    save_file(contiguous(weights), os.path.join(directory, "model.safetensors"))
    if ema is not None:
        save_file(contiguous(ema.state_dict()), os.path.join(directory, "ema.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
    if scaler is not None:
        torch.save(scaler.state_dict(), os.path.join(directory, "scaler.pt"))


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all)."""
    if keep > 0:
        for path in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reading
def read_train_state(directory: str) -> Dict:
    with open(os.path.join(directory, "train_state.json")) as f:
        return json.load(f)


def load_checkpoint(directory: str, rank: int, model, optimizer, scheduler, ema=None, scaler=None) -> bool:
    """Restore a checkpoint into the given objects and this rank's RNG state. Returns False when the checkpoint
    has no RNG state for this rank (it was saved by fewer processes): the run goes on, but not bit-exactly."""
    load_checked(model, load_file(os.path.join(directory, "model.safetensors")), f"checkpoint {directory}")
    # map to CPU: saved from cuda:0, it would otherwise land on GPU 0 in every rank before being moved
    optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt"), map_location="cpu", weights_only=True))
    if ema is not None:
        ema_path = os.path.join(directory, "ema.safetensors")
        if not os.path.isfile(ema_path):
            raise FileNotFoundError(f"training.use_ema is on but {directory} has no ema.safetensors")
        ema.load_state_dict(load_file(ema_path))
    if scaler is not None and os.path.isfile(os.path.join(directory, "scaler.pt")):
        scaler.load_state_dict(torch.load(os.path.join(directory, "scaler.pt"), weights_only=True))
    rng_path = os.path.join(directory, f"rng_state_{rank}.pt")
    if not os.path.isfile(rng_path):
        return False
    set_rng_state(torch.load(rng_path, weights_only=True))
    return True
