"""Train reAR (or RAR / plain AR) on pre-tokenized ImageNet, ImageNet shards, or the built-in toy data set.

    python scripts/train_rear.py config=configs/rear_toy.yaml                    # CPU, minutes
    accelerate launch scripts/train_rear.py config=configs/rear_s.yaml experiment.output_dir=runs/rear_s

Writes into experiment.output_dir: checkpoints/checkpoint-<step>/ (resumable, see utils/training/resume.py),
samples/step_<step>.png, generator.safetensors (final weights, EMA if on: `modeling.load_generator` loads it) and,
for the toy data set, tokenizer.safetensors and samples/final.png with the classifier's score.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time

# OpenMP threads that spin while waiting make a CPU run 10-50x slower when another process shares the cores
# (each of the many small ops waits out a scheduler slice); sleeping waiters cost little. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from modeling import build_generator, build_tokenizer  # noqa: E402
from modeling.objective import Objective  # noqa: E402
from modeling.sampler import SamplingOptions, sample_images_seeded  # noqa: E402
from utils.cli import Script, run  # noqa: E402
from utils.config import to_yaml  # noqa: E402
from utils.data.loader import batches, training_dataset  # noqa: E402
from utils.data.toy import TOY_CLASS_NAMES, tokenizer_fit_images, toy_class_share  # noqa: E402
from utils.errors import OutputError, ResourceError, out_of_memory  # noqa: E402
from utils.files import atomic_open, write_json  # noqa: E402
from utils.grids import image_grid, labelled_rows, save_png  # noqa: E402
from utils.training.ema import EMA  # noqa: E402
from utils.training.logging import MetricWindow, log_grid, start_trackers, tracker_name, with_original_names  # noqa: E402
from utils.training.optim import build_optimizer, build_scheduler  # noqa: E402
from utils.training.resume import (  # noqa: E402
    NonFiniteError,
    clean_output_folder,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_train_state,
    save_checkpoint,
    save_weights,
    write_training_state,
)
from utils.training.step import batch_tokens, make_accelerator, train_step  # noqa: E402

SCRIPT = Script(
    usage="python scripts/train_rear.py config=FILE.yaml [key.sub=value ...]   (or under accelerate launch / torchrun)",
    summary="Train reAR (or RAR / plain AR) with accelerate: resumable checkpoints, sample grids, trackers.",
    example="python scripts/train_rear.py config=configs/rear_toy.yaml training.max_train_steps=300",
    sections=("experiment.output_dir", "experiment.tracker", "experiment.init_weight", "experiment.save_every",
              "model.generator.backbone", "model.generator.perturb_mode", "model.generator.order",
              "model.generator.transition_alignment", "model.vq_model.model_type", "dataset", "training"),
)


def main(config, flags=None) -> dict:
    t, out = config.training, config.experiment.output_dir
    tracker = tracker_name(config)  # a missing tracker package stops the run here, before any work
    accelerator = make_accelerator(config, tracker, config.experiment.logging_dir or os.path.join(out, "logs"))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # Everything is built and loaded before the output folder is made: a bad file or value leaves nothing behind.
    # Same initial weights on every process; data, dropout and noise differ per process from here on.
    set_seed(t.seed)
    toy = config.dataset.name == "toy"
    tokenizer = build_tokenizer(config, fit_images=tokenizer_fit_images(config) if toy else None).to(device)
    generator = build_generator(config).to(device)
    if config.experiment.init_weight:  # e.g. a released backbone (AliTok-B) to train reAR's heads on top of
        init = config.experiment.init_weight
        generator.load_weights_file(init, f"experiment.init_weight {init}", "experiment.init_weight=PATH",
                                    new_heads=True)
    with accelerator.main_process_first():  # the main process converts a JSONL file once; the others reuse it
        dataset = training_dataset(config, tokenizer)
    if list_checkpoints(out) and not config.experiment.resume:
        # Pruning keeps the highest steps, so a fresh run here would delete its own checkpoints, not the old ones.
        raise OutputError(f"{out} already holds checkpoints and experiment.resume is False: "
                          "choose another experiment.output_dir, or remove them")
    optimizer = build_optimizer(generator, config, device)
    scheduler = build_scheduler(optimizer, config)  # stepped once per optimizer step, by hand: not prepared
    ema = EMA(generator, t.ema_decay) if t.use_ema else None
    model = torch.compile(generator) if t.compile else generator
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = Objective(config, tokenizer)

    made_folder = accelerator.is_main_process and not os.path.exists(out)
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        clean_output_folder(out)
        with atomic_open(os.path.join(out, "config.yaml")) as f:
            f.write(to_yaml(config))
    # The main process verifies the checkpoints (and sets damaged ones aside); the others take its choice.
    checkpoint = [None]
    if accelerator.is_main_process:
        checkpoint[0] = latest_checkpoint(out, warn=lambda message: print(message, file=sys.stderr))
        prune_checkpoints(out, config.experiment.keep_last_checkpoints)  # a kill between a save and its pruning
    checkpoint = broadcast_object_list(checkpoint)[0]
    # The data iterator is made before the random state is set (or restored): making it draws from it.
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

    start_trackers(accelerator, config, tracker, out)
    window = MetricWindow(device)
    describe_run(accelerator, config, dataset, generator)
    last_step = min(t.max_train_steps, t.stop_steps or t.max_train_steps)
    progress = tqdm(total=last_step, initial=step, disable=not accelerator.is_main_process, desc="train")
    micro_batch = t.per_gpu_batch_size * world  # samples one micro-step consumes over all processes
    max_grad_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    window_start = (time.time(), step)

    def next_batch():
        return batch_tokens(next(data), tokenizer, device, config.model.generator.image_seq_len)

    first_step = step
    while step < last_step:
        grad_norms_due = (step + 1) % config.experiment.log_grad_norm_every == 0
        try:
            terms, lr, parameter_norms = train_step(accelerator, model, objective, next_batch, optimizer, scheduler,
                                                    step, t.gradient_accumulation_steps, max_grad_norm, grad_norms_due)
        except (RuntimeError, MemoryError) as err:
            if not out_of_memory(err):
                raise
            if step == first_step and made_folder:  # a run that cannot take one step leaves nothing behind
                shutil.rmtree(out, ignore_errors=True)
            raise ResourceError(
                f"out of memory at step {step + 1} with training.per_gpu_batch_size={t.per_gpu_batch_size} on "
                f"{device} ({str(err).splitlines()[0]}); use a smaller training.per_gpu_batch_size (with a larger "
                "training.gradient_accumulation_steps for the same global batch), or "
                "model.generator.use_checkpoint=True") from None
        samples_seen += micro_batch * t.gradient_accumulation_steps
        if ema is not None:
            ema.update(generator)
        step += 1
        window.add(terms, step)
        progress.update(1)
        if parameter_norms:
            accelerator.log(parameter_norms, step=step)

        if step % config.experiment.log_every == 0 or step == last_step:
            metrics = read_metrics(accelerator, window, objective, config, step, samples_seen, lr, dataset)
            seconds = time.time() - window_start[0]
            metrics["samples_per_second"] = (step - window_start[1]) * micro_batch * t.gradient_accumulation_steps / seconds
            metrics["samples_per_second_per_process"] = metrics["samples_per_second"] / world
            window_start = (time.time(), step)
            accelerator.log(with_original_names(metrics), step=step)
            progress.set_postfix(
                loss=f"{metrics['loss']:.3f}", ce=f"{metrics['ce']:.3f}", enc=f"{metrics['encode_alignment']:.3f}",
                dec=f"{metrics['decode_alignment']:.3f}", r=f"{metrics['noise_rate']:.2f}",
                acc=f"{metrics['token_accuracy']:.3f}", lr=f"{lr:.2e}",
            )
        if step % config.experiment.generate_every == 0:
            stop_if_non_finite(accelerator, window)
            if accelerator.is_main_process:
                sample_grid(ema.averaged_model(generator) if ema else generator, tokenizer, config, step, accelerator,
                            tracker)
        if step % config.experiment.save_every == 0 or step == last_step:
            stop_if_non_finite(accelerator, window)
            save(accelerator, config, step, samples_seen, generator, optimizer, scheduler, ema)
    progress.close()

    summary = {"step": step, "samples_seen": samples_seen}
    if accelerator.is_main_process:
        final = ema.model_state_dict(generator) if ema is not None else generator.state_dict()
        save_weights(os.path.join(out, "generator.safetensors"), final)
        if toy:
            summary.update(finish_toy(ema.averaged_model(generator) if ema else generator, tokenizer, config))
        write_json(os.path.join(out, "summary.json"), summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def describe_run(accelerator, config, dataset, generator) -> None:
    t, g = config.training, config.model.generator
    global_batch = t.per_gpu_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    method = [f"noisy context ({g.perturb_mode})" if g.perturb_mode != "none" else "",
              "alignment (" + "+".join(h.split("_")[0] for h in generator.alignment_heads) + ")"
              if generator.alignment_heads else "", "RAR order" if g.order == "random" else ""]
    accelerator.print(
        f"training {g.backbone}: {generator.num_parameters() / 1e6:.1f}M parameters, "
        f"{', '.join(m for m in method if m) or 'plain AR'}; {accelerator.num_processes} processes on "
        f"{accelerator.device.type}, global batch {global_batch}, {t.max_train_steps} steps, precision "
        f"{t.mixed_precision}. The loss is CE + {g.transition_alignment_weight} x (encode + decode alignment), "
        "each alignment term a mean of -cos, so it can be negative."
    )
    if dataset is not None:
        passes = len(dataset) / config.experiment.max_train_examples
        accelerator.print(
            f"data: {len(dataset)} sequences; 'epoch' counts experiment.max_train_examples = "
            f"{config.experiment.max_train_examples} samples, so one pass over the data is {passes:g} epochs "
            "(ten-crop pre-tokenized ImageNet: 10 epochs a pass)"
        )


def read_metrics(accelerator, window, objective, config, step, samples_seen, lr, dataset) -> dict:
    """Averages over the logging window and all processes (the only synchronisation of the loop), and the
    schedule values of the last update."""
    stop_if_non_finite(accelerator, window)
    metrics = window.averages(lambda sums: accelerator.reduce(sums, "mean"))
    metrics["noise_rate"] = objective.ratio(step - 1)
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


def grid_classes(num_classes: int, count: int) -> torch.Tensor:
    """`count` classes spread evenly over [0, num_classes) (all of them when count >= num_classes)."""
    return torch.linspace(0, num_classes - 1, min(count, num_classes)).round().long()


def sample_grid(model, tokenizer, config, step, accelerator, tracker) -> None:
    """One sample for each of `training.num_generated_images` classes, spread over the classes."""
    classes = grid_classes(config.model.generator.condition_num_classes, config.training.num_generated_images)
    classes = classes.to(next(model.parameters()).device)
    images = sample_images_seeded(model, tokenizer, classes, SamplingOptions.from_config(config), config.sampling.seed)
    grid = image_grid(images, len(classes))
    save_png(grid, os.path.join(config.experiment.output_dir, "samples", f"step_{step:08d}.png"))
    log_grid(accelerator, tracker, grid, step)


def finish_toy(model, tokenizer, config) -> dict:
    """The toy run's end: its tokenizer, a labelled row of samples per class, the share a classifier of the toy
    classes assigns to the asked class, and the commands that take the run on to the 50k sampler and the score."""
    out = config.experiment.output_dir
    save_weights(os.path.join(out, "tokenizer.safetensors"), tokenizer.state_dict())
    num_classes = config.model.generator.condition_num_classes
    per_class = max(config.sampling.num_samples // num_classes, 1)
    class_ids = torch.arange(num_classes, device=next(model.parameters()).device).repeat_interleave(per_class)
    images = sample_images_seeded(model, tokenizer, class_ids, SamplingOptions.from_config(config), config.sampling.seed)
    share = toy_class_share(images, class_ids, config)
    grid_path = os.path.join(out, "samples", "final.png")
    save_png(labelled_rows(images, TOY_CLASS_NAMES[:num_classes], per_class, scale=2), grid_path)
    print(
        f"toy classifier: {share:.3f} of {len(class_ids)} samples show the requested class "
        f"(chance {1 / num_classes:.2f}); grid: {grid_path} (a row per class)\n"
        "next: sample the 50k sampler's way, then score the samples:\n"
        f"  python scripts/sample_imagenet_rear.py config={out}/config.yaml "
        f"experiment.generator_checkpoint={out}/generator.safetensors "
        f"experiment.tokenizer_checkpoint={out}/tokenizer.safetensors experiment.output_dir={out}_samples "
        "sampling.num_samples=1000\n"
        f"  python -m evaluator.toy {out}_samples.npz config={out}/config.yaml"
    )
    return {"toy_class_share": share, "toy_num_samples": len(class_ids)}


if __name__ == "__main__":
    run(SCRIPT, main)
