"""Sample class-balanced images for FID: `experiment.output_dir=DIR` → `DIR.npz` (`arr_0`, uint8 (N, H, W, 3)).

    torchrun --nproc_per_node=8 scripts/sample_imagenet_rear.py config=configs/rear_s.yaml \\
        experiment.generator_checkpoint=reAR-S.safetensors experiment.output_dir=runs/samples/rear_s

Also runs as a plain `python` process. `sampling.*` sets the size, seed, guidance and precision. The images are
fixed by `sampling.seed` and `sampling.per_proc_batch_size` whatever the number of processes; an interrupted run
continues where it stopped when the same command is run again. See utils/sampling.py.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from utils.config import config_from_cli  # noqa: E402
from utils.sampling import (  # noqa: E402
    SamplingOptions,
    batch_bounds,
    load_models,
    make_shards,
    merge_shards,
    npz_path,
    prepare_sample_dir,
    settings_of,
)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (NCCL on GPUs, gloo on CPUs), or (0, 1, ...) without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Long timeout: ranks wait at the final barrier while the slowest one finishes its last batches.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def on_rank0_first(fn, rank: int):
    """`fn()` on rank 0, then on the other ranks. An error on rank 0 stops every rank at once, instead of
    leaving them waiting at the barrier until its timeout."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks are told
            error = err
    failed = [None if error is None else f"{type(error).__name__}: {error}"]
    if dist.is_initialized():
        dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0] is not None:
        raise SystemExit(f"rank {rank}: stopping, rank 0 failed with {failed[0]}")
    return result if rank == 0 else fn()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str]) -> None:
    config = config_from_cli(argv)
    rank, world_size, device = setup_distributed()
    sample_dir = config.experiment.output_dir
    options = SamplingOptions.from_config(config)
    settings = settings_of(config, options, device)
    # rank 0 first, alone: it creates the folder and records the settings
    complete = on_rank0_first(lambda: prepare_sample_dir(sample_dir, settings), rank)
    if complete:
        if rank == 0:
            print(f"{npz_path(sample_dir)} is complete; nothing to do")
    else:
        generator, tokenizer = load_models(config, device)
        if rank == 0:
            print(f"sampling {config.sampling.num_samples} images with {options} on {world_size} x {device.type}")
        make_shards(generator, tokenizer, config, options, rank, world_size, device)
        barrier()
        if rank == 0:
            shape = merge_shards(sample_dir, config.sampling.num_samples, config.sampling.per_proc_batch_size)
            print(f"wrote {npz_path(sample_dir)}: arr_0 uint8 {shape}")
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
