"""Training checkpoints: everything needed to continue a run exactly, written atomically and verified on resume.

A checkpoint is a folder `OUTPUT_DIR/checkpoints/checkpoint-<step>/` holding
    model.safetensors       the generator (names as its `state_dict()`)
    ema.safetensors         the EMA weights and step, when training.use_ema
    optimizer.pt            AdamW state;  scheduler.pt  the lr schedule;  scaler.pt  the fp16 loss scale, if any
    rng_state_<rank>.pt     python, numpy, torch (and CUDA) generator states of every process
    train_state.json        step, samples consumed (the data position), world size
    manifest.json           size and SHA-256 of every file above, written last
It is written under a temporary name and renamed when complete, so a crash while saving leaves the previous
checkpoint intact and a half-written one is never mistaken for a checkpoint. On resume the newest checkpoint whose
files match its manifest is used; a damaged one (truncated, flipped bytes, a missing file) is set aside as
`checkpoint-<step>.damaged` with a warning that names it. With several machines the output folder must be on a
file system they share (every process writes its own RNG state).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.errors import OutputError, UserError
from utils.files import (
    TEMPORARY_MARK,
    WriteStopped,
    atomic_path,
    follow_umask,
    remove_temporaries,
    write_stopped,
    writing,
)
from utils.weights import load_checked

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


class NonFiniteError(UserError):
    """A non-finite loss, gradient or weight: training stops before anything is written."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> List[str]:
    """Checkpoint folders, oldest first (temporaries of an interrupted save or prune are not listed)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


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


# ------------------------------------------------------------------------------------------- integrity
def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str) -> None:
    entries = {
        name: {"size": os.path.getsize(os.path.join(directory, name)), "sha256": file_digest(os.path.join(directory, name))}
        for name in sorted(os.listdir(directory))
    }
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(entries, f, indent=2)


def damage(directory: str) -> Optional[str]:
    """What is wrong with a checkpoint folder, or None when every file matches its manifest."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    for name, entry in entries.items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != entry["size"]:
            return f"{name} has {os.path.getsize(file)} bytes, {entry['size']} were written"
        if file_digest(file) != entry["sha256"]:
            return f"{name} does not match the checksum it was written with"
    return None


def latest_checkpoint(output_dir: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """The newest intact checkpoint. Damaged ones are renamed `<name>.damaged` (kept for inspection, never loaded
    or counted again) with a warning that names them and says where training goes on from."""
    checkpoints = list_checkpoints(output_dir)
    problems = {}
    for directory in reversed(checkpoints):
        problems[directory] = damage(directory)
        if problems[directory] is None:
            break
    intact = next((d for d, problem in problems.items() if problem is None), None)
    goes_on = "resuming from the newest intact one" if intact else "no intact checkpoint is left: starting from step 0"
    for directory, problem in problems.items():
        if problem is not None:
            aside = f"{directory}.damaged"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(directory, aside)
            warn(f"warning: checkpoint {directory} is damaged ({problem}); moved it to {aside} and {goes_on}")
    return intact


# ------------------------------------------------------------------------------------------- writing
def check_finite(state_dict: Dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"{what} has non-finite values in {len(bad)} tensors (e.g. {bad[0]}); not saved")


def contiguous(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_weights(path: str, state_dict: Dict[str, torch.Tensor]) -> None:
    """One `.safetensors` file, written atomically (finite weights only)."""
    check_finite(state_dict, path)
    with atomic_path(path) as tmp:
        save_file(contiguous(state_dict), tmp)


def save_checkpoint(
    output_dir: str,
    step: int,
    train_state: Dict,
    write_shared: Callable[[str], None],
    barrier: Callable[[], None],
    rank: int,
) -> str:
    """Write checkpoint `step` collectively: every rank saves its RNG state, the main rank (0) calls
    `write_shared(directory)` for the model, optimizer, etc., writes the manifest, and renames the folder into place.
    A full disk stops with a clear error and leaves the earlier checkpoints as they were."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"checkpoint-{step:08d}")
    tmp = f"{final}{TEMPORARY_MARK}save"  # one name for every rank (pids differ)
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
            os.makedirs(tmp)
        barrier()
        write_file(torch.save, rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
        barrier()
        if rank == 0:
            write_shared(tmp)
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump({**train_state, "step": step}, f, indent=2)
            write_manifest(tmp)
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
            follow_umask(tmp)
            if os.path.exists(final):  # the same step saved again (a resumed run that ends where it began)
                shutil.rmtree(final)
            os.rename(tmp, final)
    except BaseException as err:
        stopped = err if isinstance(err, WriteStopped) else write_stopped(err, tmp) if isinstance(err, Exception) \
            else None
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if stopped is not None:
            raise OutputError(f"{stopped.what}: could not save checkpoint {final} ({stopped.detail}); the earlier "
                              f"checkpoints are intact: {stopped.remedy} and rerun to resume") from None
        raise
    barrier()
    return final


def write_training_state(directory: str, model, optimizer, scheduler, ema=None, scaler=None) -> None:
    """The main rank's part of a checkpoint. Refuses non-finite weights, so a good checkpoint is never replaced
    by a diverged one."""
    weights = model.state_dict()
    check_finite(weights, "the generator")
    write_file(save_file, contiguous(weights), os.path.join(directory, "model.safetensors"))
    if ema is not None:
        write_file(save_file, contiguous(ema.state_dict()), os.path.join(directory, "ema.safetensors"))
    write_file(torch.save, optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    write_file(torch.save, scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
    if scaler is not None:
        write_file(torch.save, scaler.state_dict(), os.path.join(directory, "scaler.pt"))


def write_file(save: Callable[[object, str], None], data: object, path: str) -> None:
    """`save(data, path)` (save_file, torch.save) for one file of a checkpoint; a full disk names the file."""
    with writing(path):
        save(data, path)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all). Each is renamed to a temporary name
    first, so that a kill during the deletion never leaves a `checkpoint-<step>` folder with files missing."""
    if keep > 0:
        for path in list_checkpoints(output_dir)[:-keep]:
            doomed = f"{path}{TEMPORARY_MARK}delete"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def clean_output_folder(output_dir: str) -> None:
    """Remove what an interrupted save, prune or final write left behind (temporaries only: checkpoints and
    outputs are never touched)."""
    for folder in (output_dir, os.path.join(output_dir, "samples"), checkpoint_root(output_dir)):
        if os.path.isdir(folder):
            remove_temporaries(folder)


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
            raise UserError(f"training.use_ema is on but {directory} has no ema.safetensors (saved without EMA)")
        ema.load_state_dict(load_file(ema_path))
    if scaler is not None and os.path.isfile(os.path.join(directory, "scaler.pt")):
        scaler.load_state_dict(torch.load(os.path.join(directory, "scaler.pt"), weights_only=True))
    rng_path = os.path.join(directory, f"rng_state_{rank}.pt")
    if not os.path.isfile(rng_path):
        return False
    set_rng_state(torch.load(rng_path, weights_only=True))
    return True
