"""Sampling images for evaluation: which classes, which seeds, the sampler call, and the files it all goes to.

A run of `num_samples` images is cut into global batches of `per_proc_batch_size` rows. Sample i has class
i // (num_samples / num_classes), so the classes come in order, equally many each (50 per class for 50k
ImageNet samples). Batch b is made by rank b % world_size and seeded with `batch_seed(seed, b)`, so the images
depend on the seed and the batch size, not on the number of processes. Each batch is saved as its own shard
the moment it is made; a rerun skips the shards that exist, and the final `.npz` is streamed from the shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

PRECISIONS = ("bf16", "fp32")


# ----------------------------------------------------------------------------------------- what to sample
def class_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Labels (num_samples,) int64: sample i has class i // (num_samples / num_classes)."""
    if num_samples <= 0 or num_samples % num_classes:
        raise ValueError(
            f"sampling.num_samples ({num_samples}) must be a positive multiple of the {num_classes} classes, "
            "so that every class gets the same number of samples"
        )
    return np.arange(num_samples, dtype=np.int64) // (num_samples // num_classes)


def batch_bounds(num_samples: int, batch_size: int) -> List[Tuple[int, int]]:
    """[start, end) of every global batch; the last one may be smaller."""
    if batch_size <= 0:
        raise ValueError(f"sampling.per_proc_batch_size must be positive, got {batch_size}")
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def batches_of_rank(num_batches: int, rank: int, world_size: int) -> range:
    return range(rank, num_batches, world_size)


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of one global batch: a hash of (seed, batch), so no two (seed, batch) pairs share a stream."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------- how to sample
@dataclass(frozen=True)
class SamplingOptions:
    guidance_scale: float
    guidance_scale_pow: float
    temperature: float
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    kv_cache: bool = True

    @classmethod
    def from_config(cls, config) -> "SamplingOptions":
        """`sampling.*`, where None means the model's released default in `model.generator.*`."""
        s, g = config.sampling, config.model.generator

        def pick(value, default):
            return default if value is None else value

        return cls(
            guidance_scale=pick(s.guidance_scale, g.guidance_scale),
            guidance_scale_pow=pick(s.guidance_scale_pow, g.guidance_scale_pow),
            temperature=pick(s.temperature, g.randomize_temperature),
            top_k=s.top_k,
            top_p=s.top_p,
            kv_cache=g.kv_cache,
        )


def generate_tokens(model: nn.Module, class_ids: Tensor, options: SamplingOptions) -> Tensor:
    """Image tokens (B, N) for raw labels (B,).

    THE call site of the sampler: every sampling script goes through here, so a faster sampler (a static-cache /
    CUDA-graph `generate` for GPUs) is swapped in at this one place.
    """
    return model.generate(
        class_ids,
        guidance_scale=options.guidance_scale,
        guidance_scale_pow=options.guidance_scale_pow,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        kv_cache=options.kv_cache,
    )


def effective_precision(precision: str, device: torch.device) -> str:
    """bf16 autocast runs on CUDA only; elsewhere sampling is fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"sampling.precision must be one of {PRECISIONS}, got '{precision}'")
    return precision if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    if effective_precision(precision, device) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_uint8(images: Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3). Truncates like the original sampler
    (`(x * 255).to(uint8)`), but in float32, so that a bf16 decoder output is not rounded to bf16 first."""
    return (images.float().clamp(0.0, 1.0) * 255.0).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


@torch.no_grad()
def sample_images(
    generator: nn.Module,
    tokenizer: nn.Module,
    class_ids: Tensor,
    options: SamplingOptions,
    precision: str = "fp32",
) -> np.ndarray:
    """uint8 images (B, H, W, 3) for raw labels (B,), drawn from the current global torch random state."""
    with autocast(precision, class_ids.device):
        images = tokenizer.decode_tokens(generate_tokens(generator, class_ids, options))
    return to_uint8(images)


def load_models(config, device: torch.device) -> Tuple[nn.Module, nn.Module]:
    """The generator (`experiment.generator_checkpoint`) and the tokenizer (`build_tokenizer`), in eval mode."""
    from modeling.rear import ReAR
    from modeling.tokenizers import build_tokenizer

    if not config.experiment.generator_checkpoint:
        raise ValueError(
            "set experiment.generator_checkpoint=PATH (a local file or a released name, e.g. reAR-S.safetensors)"
        )
    generator = ReAR.from_pretrained(config, config.experiment.generator_checkpoint)
    return generator.to(device).eval(), build_tokenizer(config).to(device).eval()


# ----------------------------------------------------------------------------------------- files
def shard_path(sample_dir: str, batch_index: int) -> str:
    return os.path.join(sample_dir, "shards", f"batch_{batch_index:06d}.npy")


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """`np.save`, but a reader (or a rerun after a crash) sees the whole file or none of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def npz_path(sample_dir: str) -> str:
    return sample_dir.rstrip("/") + ".npz"


def prepare_sample_dir(sample_dir: str, settings: dict) -> bool:
    """Record in `sample_dir/sampling.json` what the samples are made with, or check that a rerun uses the same
    (shards of other settings must not end up in one file). True if `DIR.npz` is already complete."""
    path = os.path.join(sample_dir, "sampling.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        differ = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        if differ:
            changes = ", ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            raise ValueError(
                f"{sample_dir} holds samples made with other settings ({changes}); "
                "use another experiment.output_dir or delete that folder"
            )
    elif os.path.exists(npz_path(sample_dir)):
        raise FileExistsError(
            f"{npz_path(sample_dir)} exists but was not made by this script here; delete it to resample"
        )
    else:
        os.makedirs(os.path.join(sample_dir, "shards"), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return os.path.isfile(npz_path(sample_dir))


def write_npz_from_shards(path: str, shard_paths: Sequence[str], chunk_rows: int = 256) -> Tuple[int, ...]:
    """The bytes of `np.savez(path, arr_0=np.concatenate(shards))`, written one shard at a time (10 GB of
    samples never sit in memory) to a temporary file that is renamed into place when complete."""
    if not shard_paths:
        raise ValueError("no shards to write")
    headers = [(rows.shape, rows.dtype) for rows in map(lambda p: np.load(p, mmap_mode="r"), shard_paths)]
    row_shape, dtype = headers[0][0][1:], headers[0][1]
    for p, (shape, dt) in zip(shard_paths, headers):
        if shape[1:] != row_shape or dt != dtype:
            raise ValueError(f"{p} holds {dt} {shape}, expected rows of {dtype} {row_shape}")
    shape = (sum(s[0] for s, _ in headers), *row_shape)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    tmp = f"{path}.{os.getpid()}.tmp"
    # np.savez's own layout: an uncompressed zip, member `arr_0.npy` forced to zip64, a version 1.0 .npy header.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for p in shard_paths:
                rows = np.load(p, mmap_mode="r")
                for start in range(0, len(rows), chunk_rows):
                    member.write(np.ascontiguousarray(rows[start : start + chunk_rows]).tobytes())
    os.replace(tmp, path)
    return shape


def settings_of(config, options: SamplingOptions, device: torch.device) -> dict:
    """Everything the sampled bytes depend on (but the weights' contents), to guard resumed runs."""
    s, vq = config.sampling, config.model.vq_model
    return {
        "num_samples": s.num_samples,
        "num_classes": config.model.generator.condition_num_classes,
        "per_proc_batch_size": s.per_proc_batch_size,
        "seed": s.seed,
        "precision": effective_precision(s.precision, device),
        "device_type": device.type,
        "generator_checkpoint": config.experiment.generator_checkpoint,
        "tokenizer_checkpoint": config.experiment.tokenizer_checkpoint or vq.pretrained_tokenizer_weight,
        **asdict(options),
    }


# ----------------------------------------------------------------------------------------- the run
def make_shards(
    generator: nn.Module,
    tokenizer: nn.Module,
    config,
    options: SamplingOptions,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = torch.device("cpu"),
) -> int:
    """Sample this rank's batches that have no shard yet (see the module docstring); returns how many it made."""
    s, sample_dir = config.sampling, config.experiment.output_dir
    labels = class_labels(s.num_samples, config.model.generator.condition_num_classes)
    bounds = batch_bounds(s.num_samples, s.per_proc_batch_size)
    mine = batches_of_rank(len(bounds), rank, world_size)
    todo = [b for b in mine if not os.path.isfile(shard_path(sample_dir, b))]
    rows = {b: bounds[b][1] - bounds[b][0] for b in mine}
    bar = tqdm(
        total=sum(rows.values()),
        initial=sum(rows.values()) - sum(rows[b] for b in todo),
        unit="img",
        desc=f"sampling, rank 0 of {world_size}",
        disable=rank != 0,
    )
    for b in todo:
        start, end = bounds[b]
        torch.manual_seed(batch_seed(s.seed, b))
        class_ids = torch.from_numpy(labels[start:end]).to(device)
        images = sample_images(generator, tokenizer, class_ids, options, s.precision)
        if s.save_png:  # before the shard: a batch with a shard has all its PNGs
            for index, image in enumerate(images, start):
                Image.fromarray(image).save(os.path.join(sample_dir, f"{index:06d}.png"))
        save_npy_atomic(shard_path(sample_dir, b), images)
        bar.update(end - start)
    bar.close()
    return len(todo)


def merge_shards(sample_dir: str, num_samples: int, batch_size: int) -> Tuple[int, ...]:
    """Write `DIR.npz` from the shards of every batch, then remove the shards (the .npz holds them)."""
    bounds = batch_bounds(num_samples, batch_size)
    paths = [shard_path(sample_dir, b) for b in range(len(bounds))]
    for path, (start, end) in zip(paths, bounds):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} is missing: rerun the same command to make it")
        if len(np.load(path, mmap_mode="r")) != end - start:
            raise ValueError(f"shard {path} does not hold {end - start} images; delete it and rerun")
    shape = write_npz_from_shards(npz_path(sample_dir), paths)
    shutil.rmtree(os.path.join(sample_dir, "shards"))
    return shape


__all__ = [
    "SamplingOptions",
    "batch_bounds",
    "batch_seed",
    "batches_of_rank",
    "class_labels",
    "generate_tokens",
    "load_models",
    "make_shards",
    "merge_shards",
    "npz_path",
    "prepare_sample_dir",
    "sample_images",
    "save_npy_atomic",
    "settings_of",
    "shard_path",
    "to_uint8",
    "write_npz_from_shards",
]
