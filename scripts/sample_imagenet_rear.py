"""Sample class-balanced images for FID: `experiment.output_dir=DIR` → `DIR.npz` (`arr_0` uint8 (N, H, W, 3), plus the
sampled `tokens` and `labels`); a training run's folder → `RUN/eval_samples.npz`.

    torchrun --nproc_per_node=8 scripts/sample_imagenet_rear.py config=configs/rear_s.yaml \\
        experiment.generator_checkpoint=reAR-S.safetensors experiment.output_dir=runs/samples/rear_s
    python scripts/sample_imagenet_rear.py config=runs/rear_toy/config.yaml sampling.num_samples=1000

Also runs as a plain `python` process. `sampling.*` sets the size, seed, guidance and precision. The images are
fixed by `sampling.seed` and `sampling.per_proc_batch_size` whatever the number of processes (and machines); an
interrupted run continues where it stopped when the same command is run again. SIGTERM, SIGINT or SIGUSR1 ends it
after the batch in progress, with exit code 75. See utils/fid_samples/run.py and docs/cluster.md.
"""

from __future__ import annotations

import datetime
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from modeling import build_tokenizer, load_generator  # noqa: E402
from modeling.sampler import SamplingOptions, effective_precision, sample  # noqa: E402
from modeling.tokenizers import decoded_to_uint8  # noqa: E402
from utils.cli import Script, run  # noqa: E402
from utils.errors import ResourceError, UsageError, out_of_memory  # noqa: E402
from utils.files import check_shared  # noqa: E402
from utils.fid_samples.run import (  # noqa: E402
    class_labels,
    discard_unused,
    make_shards,
    merge_shards,
    npz_path,
    prepare_sample_dir,
)
from utils.preemption import STOPPED_EXIT_CODE, RankVote, StopSignals, exit_stopped  # noqa: E402
from utils.training.run_record import samples_folder  # noqa: E402
from utils.weights import describe_file  # noqa: E402

SCRIPT = Script(
    usage="torchrun --nproc_per_node=K scripts/sample_imagenet_rear.py config=FILE.yaml "
          "experiment.generator_checkpoint=W experiment.output_dir=DIR [key.sub=value ...]   (or plain python)",
    summary="Sample class-balanced images for FID into DIR.npz (arr_0 as the ADM evaluator reads it, plus tokens "
            "and labels): resumable, and the same bytes for any number of processes. With a training run's "
            "config (config=RUN/config.yaml names its weights and folder) the samples go to RUN/eval_samples.npz.",
    example="python scripts/sample_imagenet_rear.py config=configs/rear_s.yaml "
            "experiment.generator_checkpoint=reAR-S.safetensors experiment.output_dir=runs/samples/rear_s",
    sections=("experiment.generator_checkpoint", "experiment.tokenizer_checkpoint", "experiment.output_dir",
              "sampling"),
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
    # Long timeout: the other ranks wait at the final barrier while rank 0 writes the .npz.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def on_rank0(fn, rank: int):
    """`fn()` on rank 0, its result on every rank. An error on rank 0 stops every rank at once, instead of
    leaving them waiting at the barrier until its timeout."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks are told
            error = err
    shared = [result, None if error is None else f"{type(error).__name__}: {error}"]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise SystemExit(f"rank {rank}: stopping, rank 0 failed with {shared[1]}")
    return shared[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sample_batch(generator, tokenizer, options: SamplingOptions, class_ids: torch.Tensor):
    """uint8 images (B, H, W, 3) and int32 tokens (B, N) for raw labels (B,), from the global random state."""
    tokens, images = sample(generator, tokenizer, class_ids, options)
    return decoded_to_uint8(images, tokenizer), tokens.to("cpu", torch.int32).numpy()


def settings_of(config, options: SamplingOptions, device: torch.device) -> dict:
    """Everything the sampled bytes depend on, to guard resumed runs (the weights by path and size)."""
    s, e = config.sampling, config.experiment
    tokenizer = e.tokenizer_checkpoint or config.model.vq_model.pretrained_tokenizer_weight
    return {
        "num_samples": s.num_samples,
        "num_classes": config.model.generator.condition_num_classes,
        "per_proc_batch_size": s.per_proc_batch_size,
        "seed": s.seed,
        "device_type": device.type,
        "backbone": config.model.generator.backbone,
        "generator_checkpoint": describe_file(e.generator_checkpoint),
        "tokenizer_checkpoint": describe_file(tokenizer),
        **options.settings(),
        "precision": effective_precision(options.precision, device),
    }


def start(config):
    """(rank, world size, device, generator, tokenizer): the checks that need no file, the process group, and the
    models on this rank's device. Nothing is written yet."""
    if not config.experiment.generator_checkpoint:
        raise UsageError("set experiment.generator_checkpoint=PATH (a local file or a released name, "
                         "e.g. reAR-S.safetensors)")
    class_labels(config.sampling.num_samples, config.model.generator.condition_num_classes)  # fails before any work
    sample_dir = samples_folder(config.experiment.output_dir)
    if os.path.isdir(npz_path(sample_dir)):
        raise UsageError(f"experiment.output_dir={sample_dir} writes {npz_path(sample_dir)}, which is a folder; "
                         "choose another experiment.output_dir")
    rank, world_size, device = setup_distributed()
    if device.type == "cuda":  # as the original sampler ran: fp32 with TF32 matmuls (bf16 is an opt-in)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # (under torchrun, a rank that fails here ends the whole group). The tokenizer first: a config that does not
    # describe it fails on that, not on the generator weights' shapes.
    tokenizer = build_tokenizer(config).to(device).eval()
    generator = load_generator(config, config.experiment.generator_checkpoint).to(device)
    return rank, world_size, device, generator, tokenizer


def write_samples(config, generator, tokenizer, rank: int, world_size: int, device: torch.device) -> str:
    """experiment.output_dir=DIR → DIR.npz with the `sampling.*` of `config` (every rank calls it); its path."""
    s, sample_dir = config.sampling, samples_folder(config.experiment.output_dir)
    options = SamplingOptions.from_config(config)
    # Only now, with the models loaded, is the folder made: a run that fails at start-up leaves nothing behind.
    complete = on_rank0(lambda: prepare_sample_dir(sample_dir, settings_of(config, options, device)), rank)
    if complete:
        if rank == 0:
            print(f"{npz_path(sample_dir)} is complete; nothing to do")
    else:
        if rank != 0:
            check_shared(os.path.join(sample_dir, "sampling.json"), rank)
        if rank == 0:
            print(f"sampling {s.num_samples} images with {options} on {world_size} x {device.type}")
        vote = RankVote()
        try:
            with StopSignals() as signals:  # a stop signal ends the run after the batch in progress, its shard kept
                finished = make_shards(partial(sample_batch, generator, tokenizer, options), sample_dir,
                                       s.num_samples, config.model.generator.condition_num_classes,
                                       s.per_proc_batch_size, s.seed, rank, world_size, device, s.save_png,
                                       lambda: vote.any((signals.requested,))[0])
        except BaseException as err:
            if rank == 0:
                discard_unused(sample_dir)
            if out_of_memory(err):
                raise ResourceError(f"out of memory sampling a batch of sampling.per_proc_batch_size="
                                    f"{s.per_proc_batch_size} images on {device} ({str(err).splitlines()[0]}); use a "
                                    "smaller sampling.per_proc_batch_size (the samples depend on it)") from None
            raise
        if not finished:
            exit_stopped(f"stopped by {signals.received or 'a stop signal to another process'}; the batches made so "
                         f"far are kept in {sample_dir}/shards: run the same command to continue (exit code "
                         f"{STOPPED_EXIT_CODE})", rank == 0)
        barrier()
        if rank == 0:
            shapes = merge_shards(sample_dir, s.num_samples, s.per_proc_batch_size)
            print(f"wrote {npz_path(sample_dir)}: arr_0 uint8 {shapes['arr_0']}, tokens {shapes['tokens']}, "
                  f"labels {shapes['labels']}")
    barrier()
    return npz_path(sample_dir)


def with_process_group_closed(main):
    """`main`, with the process group (if any) closed however it ends (a stop signal, an error)."""
    def closing(config, flags=None):
        try:
            return main(config, flags)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return closing


def main(config, flags=None) -> None:
    rank, world_size, device, generator, tokenizer = start(config)
    write_samples(config, generator, tokenizer, rank, world_size, device)


if __name__ == "__main__":
    run(SCRIPT, with_process_group_closed(main))
