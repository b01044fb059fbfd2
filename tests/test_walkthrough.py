"""A new user's walk from a fresh clone, at tiny sizes: train the toy model, then run the commands its run prints to
sample it with the 50k sampler and score the samples — exactly those commands."""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["model.generator.hidden_size=32", "model.generator.num_hidden_layers=2", "model.generator.num_attention_heads=2",
        "model.generator.intermediate_size=64", "model.generator.decode_align_layer_idx=1",
        "model.generator.projection_dim=32", "dataset.toy.num_images=512", "training.per_gpu_batch_size=8",
        "training.max_train_steps=20", "sampling.num_samples=20", "experiment.save_every=20",
        "experiment.generate_every=20"]


def python(command: str, *extra: str) -> subprocess.CompletedProcess:
    """A printed `python ...` command, run with this interpreter (and extra overrides, which win)."""
    words = shlex.split(command)
    assert words[0] == "python"
    result = subprocess.run([sys.executable, *words[1:], *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_toy_run_then_its_printed_sample_and_score_commands(tmp_path):
    run = tmp_path / "toy"
    trained = python(f"python scripts/train_rear.py config=configs/rear_toy.yaml experiment.output_dir={run}", *TINY)
    lines = trained.stdout.splitlines()
    sample_command, score_command = (line.strip() for line in lines[lines.index(
        "next: sample the 50k sampler's way, then score the samples (the run's config names its weights):") + 1:][:2])
    assert sample_command.startswith("python scripts/sample_imagenet_rear.py") and score_command.startswith(
        "python -m evaluator.toy")
    python(sample_command, "sampling.num_samples=100", "sampling.per_proc_batch_size=50")
    with np.load(f"{run}/eval_samples.npz") as npz:
        assert npz["arr_0"].shape == (100, 32, 32, 3) and np.array_equal(npz["labels"], np.arange(100) // 10)
    scored = python(score_command, "--json", str(tmp_path / "score.json"))
    share = float(scored.stdout.split("toy classifier: ")[1].split(" of 100")[0])
    assert 0.0 <= share <= 1.0 and "(chance 0.10)" in scored.stdout
    refused = subprocess.run([sys.executable, "-m", "evaluator.toy", f"{run}/eval_samples.npz",
                              f"config={run}/config.yaml",
                              "--inception-weights", str(tmp_path / "none.pth")],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: FID needs ≥ 2048 samples (got 100 in ")
