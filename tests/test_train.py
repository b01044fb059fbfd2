"""End-to-end training on the toy data set: it learns the classes, resumes exactly, runs on two processes,
and stops on a non-finite loss without touching the last checkpoint."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_script

from modeling.rear import ReAR
from modeling.objective import Objective
from utils.config import config_from_cli, load_config
from utils.errors import OutputError
from utils.training.batch_plan import batch_plan
from utils.training.resume import NonFiniteError, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "rear_toy.yaml")

train_rear = load_script("train_rear")

# A very small generator on a small toy set: seconds a run.
TINY = [
    "model.generator.hidden_size=32",
    "model.generator.num_hidden_layers=2",
    "model.generator.num_attention_heads=2",
    "model.generator.intermediate_size=64",
    "model.generator.decode_align_layer_idx=1",
    "model.generator.projection_dim=32",
    "dataset.toy.num_images=512",
    "training.per_gpu_batch_size=8",
    "sampling.num_samples=10",
    "experiment.log_every=2",
]


def run(output_dir, *overrides):
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to other processes on the cores
    return train_rear.main(config_from_cli([f"config={TOY}", f"experiment.output_dir={output_dir}", *TINY, *overrides]))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # dropout, EMA, noisy context and a sample grid on the way: every random stream must be restored
    common = ["model.generator.dropout=0.1", "training.use_ema=True", "training.ema_decay=0.9",
              "experiment.save_every=3", "experiment.generate_every=3", "model.generator.randomness_anneal_end=6"]
    run(tmp_path / "straight", "training.max_train_steps=6", *common)
    run(tmp_path / "restarted", "training.max_train_steps=3", *common)
    summary = run(tmp_path / "restarted", "training.max_train_steps=6", *common)
    assert summary["step"] == 6 and summary["samples_seen"] == 6 * 8
    for name in ("generator.safetensors", "checkpoints/checkpoint-00000006/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "restarted" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    exported = load_file(tmp_path / "straight" / "generator.safetensors")
    trained = load_file(tmp_path / "straight" / "checkpoints/checkpoint-00000006/model.safetensors")
    ema = load_file(tmp_path / "straight" / "checkpoints/checkpoint-00000006/ema.safetensors")
    assert torch.equal(exported["lm_head.weight"], ema["lm_head.weight"])  # the export holds the EMA weights
    assert not torch.equal(exported["lm_head.weight"], trained["lm_head.weight"])
    optim_a = torch.load(tmp_path / "straight/checkpoints/checkpoint-00000006/optimizer.pt", weights_only=True)
    optim_b = torch.load(tmp_path / "restarted/checkpoints/checkpoint-00000006/optimizer.pt", weights_only=True)
    for i in optim_a["state"]:
        assert torch.equal(optim_a["state"][i]["exp_avg_sq"], optim_b["state"][i]["exp_avg_sq"])


def test_outputs_load_with_from_pretrained(tmp_path):
    run(tmp_path, "training.max_train_steps=2", "experiment.keep_last_checkpoints=1", "experiment.save_every=1",
        "experiment.tracker=tensorboard", "experiment.generate_every=2")
    config = load_config(TOY, TINY)
    model = ReAR.from_pretrained(config, str(tmp_path / "generator.safetensors"))
    exported = load_file(tmp_path / "generator.safetensors")
    assert set(exported) == set(ReAR(config).state_dict())
    assert torch.equal(model.lm_head.weight, exported["lm_head.weight"])
    assert [Path(p).name for p in list_checkpoints(str(tmp_path))] == ["checkpoint-00000002"]  # keep_last 1
    assert (tmp_path / "samples" / "final.png").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["toy_num_samples"] == 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "rear")).Reload()  # accelerate's folder: logs/<project>
    assert set(events.Tags()["scalars"]) == {
        "loss", "ce", "encode_alignment", "decode_alignment", "token_accuracy", "grad_norm", "noise_rate", "lr",
        "epoch", "data_pass", "samples_per_second", "samples_per_second_per_process",
        # the original release's names for the same values
        "train/loss", "train/ar_loss", "train/proj_loss", "train/correct_tokens", "lr/generator", "lr/random_ratio",
        "samples/sec/gpu",
    }
    proj = events.Scalars("train/proj_loss")[0].value
    assert proj == pytest.approx(events.Scalars("encode_alignment")[0].value + events.Scalars("decode_alignment")[0].value)
    assert [e.step for e in events.Scalars("loss")] == [2]
    assert events.Scalars("epoch")[0].value == pytest.approx(2 * 8 / 10_000)
    assert events.Tags()["images"] == ["samples"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    objective = Objective.__call__

    def diverging(self, model, tokens, class_ids, step):
        parts = objective(self, model, tokens, class_ids, step)
        if step >= 3:  # the 4th update
            parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(Objective, "__call__", diverging)
    with pytest.raises(NonFiniteError, match="at step 4"):
        run(tmp_path, "training.max_train_steps=8", "experiment.save_every=2", "experiment.log_every=4")
    assert [Path(p).name for p in list_checkpoints(str(tmp_path))] == ["checkpoint-00000002"]
    weights = load_file(tmp_path / "checkpoints/checkpoint-00000002/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "generator.safetensors").exists()


@pytest.mark.slow
def test_two_processes_and_accumulation_equal_one_process_with_the_global_batch(tmp_path):
    """DDP over 2 gloo processes with batch 4 each, and 1 process accumulating 2 micro-batches of 4, both equal
    1 process with batch 8: same data, averaged gradients, and the lr schedule counted in optimizer steps
    (with the noise, class and weight dropout off)."""
    deterministic = ["model.generator.perturb_mode=none", "model.generator.class_label_dropout=0.0",
                     "training.max_train_steps=4", "lr_scheduler.params.warmup_steps=2", "experiment.save_every=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               str(ROOT / "scripts/train_rear.py"), f"config={TOY}", f"experiment.output_dir={tmp_path / 'two'}",
               *TINY, *deterministic, "training.per_gpu_batch_size=4"]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    run(tmp_path / "one", *deterministic)
    accumulate = ["training.per_gpu_batch_size=4", "training.gradient_accumulation_steps=2"]
    run(tmp_path / "accumulated", *deterministic, *accumulate)
    one = load_file(tmp_path / "one" / "generator.safetensors")
    initial = ReAR(load_config(TOY, TINY)).state_dict()
    assert not torch.allclose(one["lm_head.weight"], initial["lm_head.weight"])  # it did train
    for other in ("two", "accumulated"):
        weights = load_file(tmp_path / other / "generator.safetensors")
        for k in one:
            torch.testing.assert_close(weights[k], one[k], atol=2e-5, rtol=1e-4, msg=f"{other}: {k}")
    state = json.loads((tmp_path / "two/checkpoints/checkpoint-00000004/train_state.json").read_text())
    assert state["samples_seen"] == 4 * 8 and state["world_size"] == 2
    assert sorted(os.listdir(tmp_path / "two/checkpoints/checkpoint-00000004")).count("rng_state_1.pt") == 1


@pytest.mark.slow
def test_toy_run_learns_the_classes(tmp_path):
    """A short toy run (the README command with a smaller model and fewer steps) must draw the class it is asked
    for far above chance (0.1): a broken loss, schedule, conditioning or sampler fails this."""
    command = [sys.executable, str(ROOT / "scripts/train_rear.py"), f"config={TOY}",
               f"experiment.output_dir={tmp_path}",
               "training.max_train_steps=500", "model.generator.randomness_anneal_end=250",
               "optimizer.params.learning_rate=4e-3", "lr_scheduler.params.warmup_steps=50",
               "model.generator.hidden_size=64", "model.generator.num_hidden_layers=3",
               "model.generator.intermediate_size=256", "experiment.save_every=500", "experiment.generate_every=250",
               "sampling.num_samples=100"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["toy_num_samples"] == 100
    assert summary["toy_class_share"] >= 0.8, summary
    assert f"toy classifier: {summary['toy_class_share']:.3f} of 100 samples" in result.stdout
    assert (tmp_path / "samples" / "step_00000250.png").is_file() and (tmp_path / "samples" / "final.png").is_file()


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    run(tmp_path, "training.max_train_steps=1", "experiment.save_every=1", "experiment.generate_every=100")
    before = load_file(tmp_path / "checkpoints/checkpoint-00000001/model.safetensors")
    with pytest.raises(OutputError, match=r"already holds checkpoints and experiment.resume is False"):
        run(tmp_path, "training.max_train_steps=2", "experiment.resume=False")
    after = load_file(tmp_path / "checkpoints/checkpoint-00000001/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


class Recorder:
    """What describe_run reads of an accelerator: the process count and device; what it prints."""

    def __init__(self, processes):
        self.num_processes, self.device, self.lines = processes, torch.device("cpu"), []

    def print(self, text):
        self.lines.append(text)


REAR_LOSS = "The loss is CE + 1 x (encode + decode alignment), each alignment term a mean of -cos, so it can be negative."


@pytest.mark.parametrize("overrides, processes, method, rest", [
    (["model.generator.perturb_mode=none", "model.generator.transition_alignment=False"], 1, "plain AR",
     "on cpu: 1 process x 8 per GPU x 1 accumulation = global batch 8, 40 steps, fp32. The loss is the "
     "cross-entropy (CE)."),
    ([], 2, "noisy context (switch), alignment (encode + decode)",
     "on cpu: 2 processes x 8 per GPU x 1 accumulation = global batch 16, 40 steps, fp32. " + REAR_LOSS),
    (["model.generator.decode_align=False", "training.mixed_precision=bf16", "model.generator.perturb_mode=mask"], 1,
     "noisy context (mask), alignment (encode)", "on cpu: 1 process x 8 per GPU x 1 accumulation = global batch 8, "
     "40 steps, bf16 autocast. The loss is CE + 1 x (encode alignment), the alignment term a mean of -cos, so it "
     "can be negative."),
    (["model.generator.encode_align=False", "model.generator.transition_alignment_weight=0.5",
      "training.stop_steps=10", "model.generator.order=random", "model.generator.perturb_mode=none"], 3,
     "alignment (decode), RAR order", "on cpu: 3 processes x 8 per GPU x 1 accumulation = global batch 24, "
     "stopping at step 10 of a 40-step schedule, fp32. The loss is CE + 0.5 x (decode alignment), the alignment term a mean of -cos, so it can be "
     "negative."),
], ids=["plain AR", "reAR, 2 processes", "EN only, bf16", "DE only, RAR, stop_steps"])
def test_the_start_up_lines_describe_the_run(overrides, processes, method, rest):
    config = load_config(str(ROOT / "configs" / "rear_tiny.yaml"), ["experiment.max_train_examples=256", *overrides])
    generator = ReAR(config)
    recorder = Recorder(processes)
    train_rear.describe_run(recorder, config, list(range(256)), generator, batch_plan(config.training, processes))
    assert recorder.lines == [
        f"training rar: {generator.num_parameters() / 1e6:.1f}M parameters, {method} {rest}",
        "data: 256 sequences; an 'epoch' in the logs is experiment.max_train_examples = 256 samples, so one pass "
        "over the data is 1 epoch (ten-crop pre-tokenized ImageNet: 10 epochs a pass)",
    ]


def test_a_warm_up_longer_than_the_run_is_said_not_refused():
    """A smoke run of a released config (2 steps of a 62,500-step warm-up) is allowed; the warning names both keys."""
    short = load_config(str(ROOT / "configs" / "rear_s.yaml"), ["training.max_train_steps=2"])
    with pytest.warns(UserWarning) as caught:
        train_rear.warn_if_warmup_outlasts_the_run(short)
    assert [str(w.message) for w in caught] == [
        "'lr_scheduler.params.warmup_steps' (62500) is longer than 'training.max_train_steps' (2): the learning rate "
        "rises for the whole run and never reaches its peak 0.0004"]
    full = load_config(str(ROOT / "configs" / "rear_s.yaml"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_rear.warn_if_warmup_outlasts_the_run(full)  # 62,500 of 250,000: nothing to say
