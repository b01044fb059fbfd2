"""scripts_bash/rear_train.sh: options and environment become the accelerate command (run with a stand-in)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path, *args, **env):
    fake = tmp_path / "accelerate"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    environment = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", **env}
    for key in ("CONFIG", "OUTPUT_DIR", "TRACKER", "NUM_GPUS"):
        if key not in env:
            environment.pop(key, None)
    result = subprocess.run(["bash", str(ROOT / "scripts_bash/rear_train.sh"), *args], env=environment,
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_defaults_are_eight_gpus_and_rear_s(tmp_path):
    argv = launch(tmp_path)
    assert argv[:2] == ["launch", "--multi_gpu"]
    assert argv[argv.index("--num_processes") + 1] == "8"
    assert argv[-3:] == ["scripts/train_rear.py", "config=configs/rear_s.yaml", "experiment.output_dir=runs/rear_s"]


def test_options_environment_and_overrides(tmp_path):
    argv = launch(tmp_path, "--tracker", "tensorboard", "training.per_gpu_batch_size=128",
                  CONFIG="configs/rear_b.yaml", OUTPUT_DIR="/data/runs/b", NUM_GPUS="4", NUM_MACHINES="2")
    assert argv[argv.index("--num_processes") + 1] == "8" and argv[argv.index("--num_machines") + 1] == "2"
    assert argv[argv.index("scripts/train_rear.py") + 1 :] == [
        "config=configs/rear_b.yaml", "experiment.output_dir=/data/runs/b", "experiment.tracker=tensorboard",
        "training.per_gpu_batch_size=128",
    ]
