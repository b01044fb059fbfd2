"""Train reAR (or RAR / plain AR) on pre-tokenized ImageNet, ImageNet shards, or the built-in toy data set.

    python scripts/train_rear.py config=configs/rear_toy.yaml                    # CPU, minutes
    accelerate launch scripts/train_rear.py config=configs/rear_s.yaml experiment.output_dir=runs/rear_s

Writes into experiment.output_dir: checkpoints/checkpoint-<step>/ (resumable, see utils/checkpointing.py),
samples/step_<step>.png, generator.safetensors (final weights, EMA if on: `ReAR.from_pretrained` loads it) and,
for the toy data set, tokenizer.safetensors and samples/final.png with the classifier's score.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext

# OpenMP threads that spin while waiting make a CPU run 10-50x slower when another process shares the cores
# (each of the many small ops waits out a scheduler slice); sleeping waiters cost little. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling.losses import randomness_ratio  # noqa: E402
from modeling.rear import ReAR  # noqa: E402
from modeling.tokenizers import build_tokenizer  # noqa: E402
from utils.weights import load_checked, load_state_dict_file, resolve_weights  # noqa: E402
from utils.checkpointing import (  # noqa: E402
    NonFiniteError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_train_state,
    save_checkpoint,
    save_weights,
    write_training_state,
)
from utils.config import config_from_cli, to_yaml  # noqa: E402
from utils.data import batches, training_dataset  # noqa: E402
from utils.ema import EMA  # noqa: E402
from utils.metrics import MetricWindow, mean_parts  # noqa: E402
from utils.optim import build_optimizer, build_scheduler  # noqa: E402
from utils.samples import generate_images, grid_classes, image_grid, save_png, toy_class_share  # noqa: E402
from utils.trackers import build_tracker  # noqa: E402
from utils.training import batch_tokens, make_accelerator, rear_objective  # noqa: E402


def main(argv=None) -> dict:
    config = config_from_cli(sys.argv[1:] if argv is None else argv)
    accelerator = make_accelerator(config)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out, t = config.experiment.output_dir, config.training
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(to_yaml(config))

    # Same initial weights on every process; data, dropout and noise differ per process from here on.
    set_seed(t.seed)
    tokenizer = build_tokenizer(config).to(device)
    generator = ReAR(config).to(device)
    if config.experiment.init_weight:
        init = config.experiment.init_weight
        load_checked(generator, load_state_dict_file(resolve_weights(init)), f"experiment.init_weight {init}")
    with accelerator.main_process_first():  # the main process converts a JSONL file once; the others reuse it
        dataset = training_dataset(config, tokenizer)
    optimizer = build_optimizer(generator, config, device)
    scheduler = build_scheduler(optimizer, config)  # stepped once per optimizer step, by hand: not prepared
    ema = EMA(generator, t.ema_decay) if t.use_ema else None
    model = torch.compile(generator) if t.compile else generator
    model, optimizer = accelerator.prepare(model, optimizer)

    # The data iterator is made before the random state is set (or restored): making it draws from it.
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not config.experiment.resume:
        # Pruning keeps the highest steps, so a fresh run here would delete its own checkpoints, not the old ones.
        raise FileExistsError(
            f"{out} already holds checkpoints (newest {checkpoint}) and experiment.resume is False: "
            "choose another experiment.output_dir, or remove them"
        )
    state = read_train_state(checkpoint) if checkpoint else {"step": 0, "samples_seen": 0}
    step, samples_seen = state["step"], state["samples_seen"]
    data = iter(batches(config, dataset, rank, world, samples_seen, step))
    restored = checkpoint is not None and load_checkpoint(
        checkpoint, rank, generator, optimizer, scheduler, ema, accelerator.scaler
    )
    if not restored:  # a fresh run, or more processes than the checkpoint had
        set_seed(t.seed + step, device_specific=True)
    if checkpoint is not None:
        accelerator.print(f"resumed from {checkpoint} at step {step} ({samples_seen} samples)")

    tracker = build_tracker(config, out, accelerator.is_main_process)
    window = MetricWindow(device)
    describe_run(accelerator, config, dataset, generator)
    progress = tqdm(total=t.max_train_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    micro_batch = t.per_gpu_batch_size * world  # samples one micro-step consumes over all processes
    max_grad_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    window_start = (time.time(), step)

    while step < t.max_train_steps:
        micro_parts = []
        for micro in range(t.gradient_accumulation_steps):
            tokens, class_ids = batch_tokens(next(data), tokenizer, device)
            last = micro == t.gradient_accumulation_steps - 1
            with nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    parts = rear_objective(model, tokenizer, tokens, class_ids, step, config)
                accelerator.backward(parts.loss / t.gradient_accumulation_steps)
            micro_parts.append(parts)
            samples_seen += micro_batch
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(generator)
        step += 1
        window.add(mean_parts(micro_parts), grad_norm, step)
        progress.update(1)

        if step % config.experiment.log_every == 0 or step == t.max_train_steps:
            metrics = read_metrics(accelerator, window, config, step, samples_seen, lr, dataset)
            metrics["samples_per_second"] = (
                (step - window_start[1]) * micro_batch * t.gradient_accumulation_steps / (time.time() - window_start[0])
            )
            window_start = (time.time(), step)
            tracker.log(metrics, step)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_accuracy']:.3f}", lr=f"{lr:.2e}")
        if step % config.experiment.generate_every == 0:
            stop_if_non_finite(accelerator, window)
            if accelerator.is_main_process:
                sample_grid(sampling_model(generator, ema, config), tokenizer, config, step, tracker)
        if step % config.experiment.save_every == 0 or step == t.max_train_steps:
            stop_if_non_finite(accelerator, window)
            save(accelerator, config, step, samples_seen, generator, optimizer, scheduler, ema)
    progress.close()

    summary = {"step": step, "samples_seen": samples_seen}
    if accelerator.is_main_process:
        final = ema.model_state_dict(generator) if ema is not None else generator.state_dict()
        save_weights(os.path.join(out, "generator.safetensors"), final)
        if config.dataset.name == "toy":
            summary.update(evaluate_toy(sampling_model(generator, ema, config), tokenizer, config))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def describe_run(accelerator, config, dataset, generator) -> None:
    t = config.training
    global_batch = t.per_gpu_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    accelerator.print(
        f"reAR training: {generator.num_parameters() / 1e6:.1f}M parameters, {accelerator.num_processes} processes "
        f"on {accelerator.device.type}, global batch {global_batch}, {t.max_train_steps} steps, "
        f"precision {t.mixed_precision}"
    )
    if dataset is not None:
        passes = len(dataset) / config.experiment.max_train_examples
        accelerator.print(
            f"data: {len(dataset)} sequences; 'epoch' counts experiment.max_train_examples = "
            f"{config.experiment.max_train_examples} samples, so one pass over the data is {passes:g} epochs "
            "(ten-crop pre-tokenized ImageNet: 10 epochs a pass)"
        )


def read_metrics(accelerator, window, config, step, samples_seen, lr, dataset) -> dict:
    """Averages over the logging window and all processes (the only synchronisation of the loop), and the
    schedule values of the last update."""
    stop_if_non_finite(accelerator, window)
    g = config.model.generator
    metrics = window.averages(lambda sums: accelerator.reduce(sums, "mean"))
    metrics["noise_rate"] = randomness_ratio(step - 1, g.randomness_anneal_start, g.randomness_anneal_end)
    metrics["lr"] = lr
    metrics["epoch"] = samples_seen / config.experiment.max_train_examples
    if dataset is not None:
        metrics["data_pass"] = samples_seen / len(dataset)
    return metrics


def stop_if_non_finite(accelerator, window) -> None:
    """Every process stops together at the first non-finite loss or gradient, before anything is saved."""
    bad_step = accelerator.gather(window.first_non_finite[None]).max()
    if int(bad_step) >= 0:
        raise NonFiniteError(
            f"non-finite loss or gradient at step {int(bad_step)}; stopping without saving "
            "(the last checkpoint is intact; try a lower learning rate or fp32)"
        )


def save(accelerator, config, step, samples_seen, generator, optimizer, scheduler, ema) -> None:
    out = config.experiment.output_dir

    def write_shared(directory):
        write_training_state(directory, generator, optimizer, scheduler, ema, accelerator.scaler)

    train_state = {"samples_seen": samples_seen, "world_size": accelerator.num_processes}
    save_checkpoint(out, step, train_state, write_shared, accelerator.wait_for_everyone, accelerator.process_index)
    if accelerator.is_main_process:
        prune_checkpoints(out, config.experiment.keep_last_checkpoints)


def sampling_model(generator, ema, config):
    """The generator to sample from: the EMA weights in a copy when there are some."""
    if ema is None:
        return generator
    model = copy.deepcopy(generator)  # not ReAR(config): its random init would draw from the training stream
    model.load_state_dict(ema.model_state_dict(generator))
    return model


def sample_grid(model, tokenizer, config, step, tracker) -> None:
    """One sample for each of `training.num_generated_images` classes, spread over the classes."""
    num_classes, count = config.model.generator.condition_num_classes, config.training.num_generated_images
    classes = grid_classes(num_classes, count).to(next(model.parameters()).device)
    grid = image_grid(generate_images(model, tokenizer, classes, config, seed=config.sampling.seed), len(classes))
    save_png(grid, os.path.join(config.experiment.output_dir, "samples", f"step_{step:08d}.png"))
    tracker.log_image("samples", grid, step)


def evaluate_toy(model, tokenizer, config) -> dict:
    """A row of samples per toy class, and the share a classifier of the toy classes assigns to the asked class."""
    out = config.experiment.output_dir
    save_weights(os.path.join(out, "tokenizer.safetensors"), tokenizer.state_dict())
    num_classes = config.model.generator.condition_num_classes
    per_class = max(config.sampling.num_samples // num_classes, 1)
    class_ids = torch.arange(num_classes, device=next(model.parameters()).device).repeat_interleave(per_class)
    images = generate_images(model, tokenizer, class_ids, config, seed=config.sampling.seed)
    share = toy_class_share(images, class_ids, config)
    grid_path = os.path.join(out, "samples", "final.png")
    save_png(image_grid(images, columns=per_class), grid_path, scale=2)
    print(
        f"toy classifier: {share:.3f} of {len(class_ids)} samples show the requested class "
        f"(chance {1 / num_classes:.2f}); grid: {grid_path} (a row per class)"
    )
    return {"toy_class_share": share, "toy_num_samples": len(class_ids)}


if __name__ == "__main__":
    main()
