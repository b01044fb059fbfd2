"""The 50k-sample run for evaluation: which classes, which seeds, and the files it all goes to.

A run of `num_samples` images is cut into global batches of `per_proc_batch_size` rows. Sample i has class
i // (num_samples / num_classes), so the classes come in order, equally many each (50 per class for 50k ImageNet
samples). Batch b is made by rank b % world_size and seeded with `batch_seed(seed, b)`, so the output depends on the
seed and the batch size, not on the number of processes. Each batch is saved as its own shard (`.npz`: the images,
their tokens and labels) the moment it is made; a rerun skips the shards that exist, and `DIR.npz` is streamed
from the shards: `arr_0` uint8 (N, H, W, 3) as the ADM evaluator reads it, plus `tokens` (N, L) and `labels` (N,).
A stop signal ends the run after the batch in progress, with its shard (see `make_shards`). With several machines,
the folder is on a file system they all share: every rank writes its shards there, and rank 0 streams the .npz.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import warnings
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import ConfigError, OutputError, UserError
from utils.files import (
    atomic_path,
    changed_settings,
    read_record,
    remove_temporaries,
    remove_temporaries_of,
    write_json,
)
from utils import grids

MEMBERS = ("arr_0", "tokens", "labels")  # what a shard and the final .npz hold, in this order


# ----------------------------------------------------------------------------------------- what to sample
def class_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Labels (num_samples,) int64: sample i has class i // (num_samples / num_classes)."""
    if num_samples <= 0 or num_samples % num_classes:
        raise ConfigError(
            f"sampling.num_samples ({num_samples}) must be a positive multiple of the {num_classes} classes, "
            "so that every class gets the same number of samples"
        )
    return np.arange(num_samples, dtype=np.int64) // (num_samples // num_classes)


def batch_bounds(num_samples: int, batch_size: int) -> List[Tuple[int, int]]:
    """[start, end) of every global batch; the last one may be smaller."""
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def batches_of_rank(num_batches: int, rank: int, world_size: int) -> range:
    return range(rank, num_batches, world_size)


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of one global batch: a hash of (seed, batch), so no two (seed, batch) pairs share a stream."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------- files
def shard_path(sample_dir: str, batch_index: int) -> str:
    return os.path.join(sample_dir, "shards", f"batch_{batch_index:06d}.npz")


def npz_path(sample_dir: str) -> str:
    return sample_dir.rstrip("/") + ".npz"


def shard_problem(path: str, rows: int) -> Optional[str]:
    """What is wrong with the shard at `path`, which should hold `rows` samples (a truncated or empty file, a member
    missing or of another length), or None. Only the headers are read: a shard is renamed into place whole, so what
    damages one comes from outside (a copy, a disk), and the .npz's merge reads every byte against its checksum."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in MEMBERS:
                with archive.open(f"{name}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape = read_header(member)[0]
                if shape[:1] != (rows,):
                    return f"its {name} holds {shape[0] if shape else 0} rows, not {rows}"
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def save_shard(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """One batch's arrays as an uncompressed `.npz`, atomically (a rerun after a crash sees all of it or none)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{name: arrays[name] for name in MEMBERS})


def prepare_sample_dir(sample_dir: str, settings: dict) -> bool:
    """Record in `sample_dir/sampling.json` what the samples are made with, or check that a rerun uses the same
    (samples of other settings or another checkpoint must not end up in one file). True if `DIR.npz` is complete.
    Called once the models have loaded, so that a run that fails at start-up leaves no folder behind."""
    remove_temporaries(sample_dir)  # what a killed run was writing
    remove_temporaries(os.path.join(sample_dir, "shards"))
    remove_temporaries_of(npz_path(sample_dir))
    path = os.path.join(sample_dir, "sampling.json")
    recorded = None
    if os.path.isfile(path):
        try:
            recorded = read_record(path)
        except ValueError as e:
            raise OutputError(f"{path} is damaged ({e}); delete {sample_dir} to sample again") from None
    elif os.path.exists(npz_path(sample_dir)):
        raise OutputError(f"{npz_path(sample_dir)} exists but was not made by this script here; delete it to resample")
    made = os.path.exists(npz_path(sample_dir)) or glob.glob(os.path.join(glob.escape(sample_dir), "shards", "*.npz"))
    if recorded is not None and made:
        changes = changed_settings(recorded, settings)
        if changes:
            raise OutputError(
                f"{sample_dir} holds samples made with other settings ({changes}); "
                "use another experiment.output_dir, or delete that folder to start again"
            )
    complete = os.path.isfile(npz_path(sample_dir))
    if complete:  # a kill after the .npz was renamed into place but before its shards were deleted
        shutil.rmtree(os.path.join(sample_dir, "shards"), ignore_errors=True)
    else:
        os.makedirs(os.path.join(sample_dir, "shards"), exist_ok=True)
    if recorded != settings:  # a new folder, or one where nothing was made yet: the settings of this run
        write_json(path, settings)
    return complete


def discard_unused(sample_dir: str) -> None:
    """Remove what `prepare_sample_dir` made when no sample was made since: a run that fails before its first
    shard leaves nothing behind."""
    shards = os.path.join(sample_dir, "shards")
    if os.path.exists(npz_path(sample_dir)) or glob.glob(os.path.join(glob.escape(shards), "*.npz")):
        return
    shutil.rmtree(shards, ignore_errors=True)
    for leftover in (os.path.join(sample_dir, "sampling.json"), sample_dir):
        if os.path.isfile(leftover):
            os.remove(leftover)
        elif os.path.isdir(leftover) and not os.listdir(leftover):
            os.rmdir(leftover)


def write_npz_from_shards(path: str, shard_paths: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """The bytes of `np.savez(path, arr_0=..., tokens=..., labels=...)` of the concatenated shards, written one shard
    at a time (10 GB of samples never sit in memory) to a temporary file renamed into place when complete."""
    if not shard_paths:
        raise ValueError("no shards to write")
    shapes = {}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in MEMBERS:
            headers = []
            for p in shard_paths:
                with np.load(p) as shard:
                    headers.append((shard[name].shape, shard[name].dtype))
            row_shape, dtype = headers[0][0][1:], headers[0][1]
            for p, (shape, dt) in zip(shard_paths, headers):
                if shape[1:] != row_shape or dt != dtype:
                    raise UserError(f"{p} holds {name} {dt} {shape}, expected rows of {dtype} {row_shape}")
            shape = (sum(s[0] for s, _ in headers), *row_shape)
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            # np.savez's own layout: an uncompressed zip, members forced to zip64, a version 1.0 .npy header.
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for p in shard_paths:
                    with np.load(p) as shard:
                        member.write(np.ascontiguousarray(shard[name]).tobytes())
            shapes[name] = shape
    return shapes


# ----------------------------------------------------------------------------------------- the run
SampleBatch = Callable[[torch.Tensor], Tuple[np.ndarray, np.ndarray]]


def make_shards(
    sample_batch: SampleBatch,
    sample_dir: str,
    num_samples: int,
    num_classes: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = torch.device("cpu"),
    save_png: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Sample this rank's batches that have no shard yet. `sample_batch(class_ids)` gives uint8 images (B, H, W, 3)
    and their tokens (B, L), drawn from the global torch random state.

    The batches go in rounds of one per rank; after each round every rank asks `stop_requested()` (equally often on
    every rank, so it may be a collective vote), and True ends the run there, its shards kept. Returns True when every
    batch of this rank has its shard, False when stopped."""
    labels = class_labels(num_samples, num_classes)
    bounds = batch_bounds(num_samples, batch_size)
    mine = batches_of_rank(len(bounds), rank, world_size)
    rows = {b: bounds[b][1] - bounds[b][0] for b in mine}
    todo = {b for b in mine if not usable_shard(shard_path(sample_dir, b), rows[b])}
    bar = tqdm(total=sum(rows.values()), initial=sum(rows.values()) - sum(rows[b] for b in todo), unit="img",
               desc=f"sampling, rank 0 of {world_size}", disable=rank != 0)
    rounds = math.ceil(len(bounds) / world_size)
    for round_index in range(rounds):
        b = round_index * world_size + rank
        if b in todo:
            start, end = bounds[b]
            torch.manual_seed(batch_seed(seed, b))
            images, tokens = sample_batch(torch.from_numpy(labels[start:end]).to(device))
            if save_png:  # before the shard: a batch with a shard has all its PNGs
                for index, image in enumerate(images, start):
                    grids.save_png(image, os.path.join(sample_dir, f"{index:06d}.png"))
            save_shard(shard_path(sample_dir, b), {"arr_0": images, "tokens": tokens, "labels": labels[start:end]})
            bar.update(end - start)
        if stop_requested():
            bar.close()
            return round_index == rounds - 1
    bar.close()
    return True


def usable_shard(path: str, rows: int) -> bool:
    """Whether the shard at `path` exists whole; a damaged one is deleted, with a warning, to be drawn again (its
    samples are fixed by the seed and the batch)."""
    if not os.path.isfile(path):
        return False
    problem = shard_problem(path, rows)
    if problem is not None:
        warnings.warn(f"shard {path} is damaged ({problem}); drawing its samples again")
        os.remove(path)
    return problem is None


def merge_shards(sample_dir: str, num_samples: int, batch_size: int) -> Dict[str, Tuple[int, ...]]:
    """Write `DIR.npz` from the shards of every batch, then remove the shards (the .npz holds them)."""
    bounds = batch_bounds(num_samples, batch_size)
    paths = [shard_path(sample_dir, b) for b in range(len(bounds))]
    for path, (start, end) in zip(paths, bounds):
        if not usable_shard(path, end - start):
            raise UserError(f"shard {path} is missing: rerun the same command to make it")
    shapes = write_npz_from_shards(npz_path(sample_dir), paths)
    shutil.rmtree(os.path.join(sample_dir, "shards"))
    return shapes


__all__ = [
    "batch_bounds",
    "batch_seed",
    "batches_of_rank",
    "class_labels",
    "discard_unused",
    "make_shards",
    "merge_shards",
    "npz_path",
    "prepare_sample_dir",
    "save_shard",
    "shard_path",
    "shard_problem",
    "usable_shard",
    "write_npz_from_shards",
]
