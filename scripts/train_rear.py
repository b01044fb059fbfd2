"""Train reAR (or RAR / plain AR) on pre-tokenized ImageNet, ImageNet shards, or the built-in toy data set.

    python scripts/train_rear.py config=configs/rear_toy.yaml                    # CPU, minutes
    accelerate launch scripts/train_rear.py config=configs/rear_s.yaml experiment.output_dir=runs/rear_s

Writes into experiment.output_dir: config.yaml (every setting, naming the run's weights: `config=RUN/config.yaml`
alone serves the sampler, the demo and the measurements; see utils/training/run_record.py),
checkpoints/checkpoint-<step>/ (resumable, see utils/training/resume.py), samples/step_<step>.png,
generator.safetensors (final weights, EMA if on: `modeling.load_generator` loads it), a fitted tokenizer's
tokenizer.safetensors and, for the toy data set, samples/final.png with the classifier's score. Training into a
folder that holds a run continues it, and refuses settings that would make another model. SIGTERM, SIGINT or
SIGUSR1 (a preemption, Ctrl-C, a time limit) ends the run after the step in progress, saved, with exit code 75:
the same command continues it (docs/cluster.md, also for several machines and SLURM).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

import torch  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from modeling import build_generator, build_tokenizer  # noqa: E402
from modeling.tokenizers import fits_tokenizer  # noqa: E402
from modeling.objective import Objective  # noqa: E402
from modeling.sampler import SamplingOptions, sample_images_seeded  # noqa: E402
from utils.cli import Script, run  # noqa: E402
from utils.data.loader import batches, training_dataset  # noqa: E402
from utils.data.toy import TOY_CLASS_NAMES, tokenizer_fit_images, toy_class_share  # noqa: E402
from utils.errors import ConfigError, OutputError, ResourceError, out_of_memory  # noqa: E402
from utils.files import check_shared, write_json  # noqa: E402
from utils.grids import image_grid, labelled_rows, save_png  # noqa: E402
from utils.preemption import STOPPED_EXIT_CODE, RankVote, SaveClock, StopSignals, exit_stopped  # noqa: E402
from utils.training.batch_plan import batch_plan  # noqa: E402
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
from utils.training.run_record import (  # noqa: E402
    GENERATOR,
    SAMPLES,
    TOKENIZER,
    check_same_run,
    run_config,
    write_run_config,
)
from utils.training.step import batch_tokens, make_accelerator, train_step  # noqa: E402

SCRIPT = Script(
    usage="python scripts/train_rear.py config=FILE.yaml [key.sub=value ...]   (or under accelerate launch / torchrun)",
    summary="Train reAR (or RAR / plain AR) with accelerate: resumable checkpoints, sample grids, trackers.",
    example="python scripts/train_rear.py config=configs/rear_toy.yaml training.max_train_steps=300",
    sections=("experiment.output_dir", "experiment.tracker", "experiment.init_weight", "experiment.save_every",
              "experiment.save_every_minutes",
              "model.generator.backbone", "model.generator.perturb_mode", "model.generator.order",
              "model.generator.transition_alignment", "model.vq_model.model_type", "dataset", "training"),
)


def main(config, flags=None) -> dict:
    t, out = config.training, config.experiment.output_dir
    tracker = tracker_name(config)  # a missing tracker package stops the run here, before any work
    accelerator = make_accelerator(config, tracker, config.experiment.logging_dir or os.path.join(out, "logs"))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    plan = batch_plan(t, world)  # a global batch that does not divide among the processes stops here

    # Everything is built and loaded before the output folder is made: a bad file or value leaves nothing behind.
    # Same initial weights on every process; data, dropout and noise differ per process from here on.
    set_seed(t.seed)
    toy, fit = config.dataset.name == "toy", fits_tokenizer(config)
    if fit and not toy:
        raise ConfigError(f"the '{config.model.vq_model.model_type}' tokenizer is fitted on the toy images at "
                          f"start-up: with dataset.name={config.dataset.name} give it weights "
                          "(experiment.tokenizer_checkpoint=PATH)")
    tokenizer = build_tokenizer(config, fit_images=tokenizer_fit_images(config) if fit else None).to(device)
    generator = build_generator(config).to(device)
    if config.experiment.init_weight:  # e.g. a released backbone (AliTok-B) to train reAR's heads on top of
        init = config.experiment.init_weight
        generator.load_weights_file(init, f"experiment.init_weight {init}", "experiment.init_weight=PATH",
                                    new_heads=True)
    record = run_config(config, out, fitted_tokenizer=fit)  # the config.yaml of the run, naming its weights
    check_same_run(out, record)  # a folder that holds another model is refused here, untouched
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
        if fit:  # the run's config names it: the folder is self-describing from the start
            save_weights(os.path.join(out, TOKENIZER), tokenizer.state_dict())
        write_run_config(out, record)
    # The main process verifies the checkpoints (and sets damaged ones aside); the others take its choice.
    checkpoint = [None]
    if accelerator.is_main_process:
        checkpoint[0] = latest_checkpoint(out, warn=lambda message: print(message, file=sys.stderr))
        prune_checkpoints(out, config.experiment.keep_last_checkpoints)  # a kill between a save and its pruning
    checkpoint = broadcast_object_list(checkpoint)[0]
    if not accelerator.is_main_process:
        check_shared(os.path.join(out, "config.yaml"), rank)  # several machines write into one folder
    # The data iterator is made before the random state is set (or restored): making it draws from it.
    state = read_train_state(checkpoint) if checkpoint else {"step": 0, "samples_seen": 0}
    step, samples_seen = state["step"], state["samples_seen"]
    data = iter(batches(config, dataset, rank, world, samples_seen, step, plan.per_gpu))
    restored = checkpoint is not None and load_checkpoint(
        checkpoint, rank, generator, optimizer, scheduler, ema, accelerator.scaler
    )
    if not restored:  # a fresh run, or more processes than the checkpoint had
        set_seed(t.seed + step, device_specific=True)
    last_step = min(t.max_train_steps, t.stop_steps or t.max_train_steps)
    if checkpoint is not None:
        accelerator.print(f"resumed from {checkpoint} at step {step} ({samples_seen} samples): "
                          f"{plural(last_step - step, 'step')} to go, to step {last_step}")
        warn_if_global_batch_changed(accelerator, state, plan)

    start_trackers(accelerator, config, tracker, out)
    window = MetricWindow(device)
    describe_run(accelerator, config, dataset, generator, plan)
    if accelerator.is_main_process:
        warn_if_warmup_outlasts_the_run(config)
    progress = tqdm(total=last_step, initial=step, disable=not accelerator.is_main_process, desc="train")
    max_grad_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    window_start = (time.time(), step)
    vote, clock = RankVote(), SaveClock(config.experiment.save_every_minutes)

    def next_batch():
        return batch_tokens(next(data), tokenizer, device, config.model.generator.image_seq_len)

    first_step = step
    with StopSignals() as signals:  # from here a stop signal ends the run after the step in progress, saved
        while step < last_step:
            grad_norms_due = (step + 1) % config.experiment.log_grad_norm_every == 0
            try:
                terms, lr, parameter_norms = train_step(accelerator, model, objective, next_batch, optimizer,
                                                        scheduler, step, plan.accumulation, max_grad_norm,
                                                        grad_norms_due)
            except (RuntimeError, MemoryError) as err:
                # a run that cannot take its first step leaves nothing behind
                raise out_of_memory_error(err, step, plan, t, device, out if made_folder and step == first_step
                                          else None) from None
            samples_seen += plan.global_batch
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
                metrics["samples_per_second"] = (step - window_start[1]) * plan.global_batch / seconds
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
                    sample_grid(ema.averaged_model(generator) if ema else generator, tokenizer, config, step,
                                accelerator, tracker)
            by_time, stop = vote.any((clock.due, signals.requested))  # every process decides alike
            if step % config.experiment.save_every == 0 or step == last_step or by_time or stop:
                stop_if_non_finite(accelerator, window)
                saved = save(accelerator, config, step, samples_seen, plan, generator, optimizer, scheduler, ema)
                clock.reset()
            if stop and step < last_step:  # (at the last step the final outputs are written, and the run is done)
                progress.close()
                accelerator.wait_for_everyone()  # all processes leave together, once the pruning is done
                accelerator.end_training()
                exit_stopped(f"stopped by {signals.received or 'a stop signal to another process'} after step "
                             f"{step}, saved in {saved}: run the same command to continue (exit code "
                             f"{STOPPED_EXIT_CODE})", accelerator.is_main_process)
        progress.close()

        summary = {"step": step, "samples_seen": samples_seen}
        if accelerator.is_main_process:
            final = ema.model_state_dict(generator) if ema is not None else generator.state_dict()
            save_weights(os.path.join(out, GENERATOR), final)
            if toy:
                summary.update(finish_toy(ema.averaged_model(generator) if ema else generator, tokenizer, config))
            write_json(os.path.join(out, "summary.json"), summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def plural(count, word: str, words: str = "") -> str:
    """'1 step', '3 steps', '1 process', '2 processes' (`words`: the plural, if not word + s)."""
    return f"{count:g} {word if count == 1 else words or word + 's'}"


def describe_run(accelerator, config, dataset, generator, plan) -> None:
    t, g = config.training, config.model.generator
    heads = [name.split("_")[0] for name in generator.alignment_heads]  # encode, decode: the ones built
    method = [f"noisy context ({g.perturb_mode})" if g.perturb_mode != "none" else "",
              f"alignment ({' + '.join(heads)})" if heads else "", "RAR order" if g.order == "random" else ""]
    steps = (plural(t.max_train_steps, "step") if not t.stop_steps or t.stop_steps >= t.max_train_steps
             else f"stopping at step {t.stop_steps} of a {t.max_train_steps}-step schedule")
    precision = "bf16 autocast" if t.mixed_precision == "bf16" else "fp32"
    loss = "The loss is the cross-entropy (CE)."
    if heads:
        terms = " + ".join(heads)
        loss = (f"The loss is CE + {g.transition_alignment_weight:g} x ({terms} alignment), "
                f"{'each alignment term' if len(heads) > 1 else 'the alignment term'} a mean of -cos, so it can be "
                "negative.")
    accelerator.print(
        f"training {g.backbone}: {generator.num_parameters() / 1e6:.1f}M parameters, "
        f"{', '.join(m for m in method if m) or 'plain AR'} on {accelerator.device.type}: {plan.describe()}, "
        f"{steps}, {precision}. {loss}"
    )
    if dataset is not None:
        passes = len(dataset) / config.experiment.max_train_examples
        crops = " (ten-crop pre-tokenized ImageNet: 10 epochs a pass)" if config.dataset.name != "toy" else ""
        accelerator.print(
            f"data: {len(dataset)} sequences; an 'epoch' in the logs is experiment.max_train_examples = "
            f"{config.experiment.max_train_examples} samples, so one pass over the data is "
            f"{plural(passes, 'epoch')}{crops}"
        )


def out_of_memory_error(err: BaseException, step: int, plan, t, device, remove: Optional[str]) -> BaseException:
    """What the training step's `err` is to the user: running out of memory is a ResourceError that names the batch
    (the folder `remove`, made by this run, is removed first); anything else stays itself."""
    if not out_of_memory(err):
        return err
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)
    keep = (f"the global batch stays {plan.global_batch}" if t.global_batch_size is not None
            else "with a larger training.gradient_accumulation_steps for the same global batch")
    return ResourceError(
        f"out of memory at step {step + 1} with training.per_gpu_batch_size={plan.per_gpu} on {device} "
        f"({str(err).splitlines()[0]}); use a smaller training.per_gpu_batch_size ({keep}), or "
        "model.generator.use_checkpoint=True")


def warn_if_warmup_outlasts_the_run(config) -> None:
    """A warm-up longer than the run is well defined (the rate rises to the end) and fine for a smoke test, but in a
    real run it is a mistake: said, not refused (as torchtitan does; it also shortens the warm-up, which we do not)."""
    warmup, steps = config.lr_scheduler.params.warmup_steps, config.training.max_train_steps
    if warmup > steps:
        warnings.warn(f"'lr_scheduler.params.warmup_steps' ({warmup}) is longer than 'training.max_train_steps' "
                      f"({steps}): the learning rate rises for the whole run and never reaches its peak "
                      f"{config.optimizer.params.learning_rate:g}")


def warn_if_global_batch_changed(accelerator, state: dict, plan) -> None:
    """The schedules count optimizer steps: a resume with another global batch (e.g. twice the GPUs without
    training.global_batch_size) trains on a different recipe from there on, so it is said."""
    saved = state.get("global_batch", plan.global_batch)
    if saved != plan.global_batch and accelerator.is_main_process:
        print(f"warning: the checkpoint was trained at global batch {saved}, this run's is {plan.global_batch} "
              f"({plan.describe()}); set training.global_batch_size={saved} to keep it", file=sys.stderr)


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


def save(accelerator, config, step, samples_seen, plan, generator, optimizer, scheduler, ema) -> str:
    out = config.experiment.output_dir

    def write_shared(directory):
        write_training_state(directory, generator, optimizer, scheduler, ema, accelerator.scaler)

    train_state = {"samples_seen": samples_seen, "world_size": accelerator.num_processes,
                   "global_batch": plan.global_batch}
    saved = save_checkpoint(out, step, train_state, write_shared, accelerator.wait_for_everyone,
                            accelerator.process_index)
    if accelerator.is_main_process:
        prune_checkpoints(out, config.experiment.keep_last_checkpoints)
    return saved


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
        "next: sample the 50k sampler's way, then score the samples (the run's config names its weights):\n"
        f"  python scripts/sample_imagenet_rear.py config={out}/config.yaml sampling.num_samples=1000\n"
        f"  python -m evaluator.toy {out}/{SAMPLES}.npz config={out}/config.yaml"
    )
    return {"toy_class_share": share, "toy_num_samples": len(class_ids)}


if __name__ == "__main__":
    run(SCRIPT, main)
