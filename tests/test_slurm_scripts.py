"""scripts_bash/slurm_train.sh and slurm_sample.sh: `--help`, the srun command they make from the allocation (nodes
x GPUs, torch.distributed's environment), and the requeue after the processes stopped on a signal (exit 75), run
with stand-ins for srun and scontrol. tests/test_cluster.py runs the training script's whole cycle (stopped by
SLURM's signal, requeued, resumed) with an srun stand-in that starts the processes."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": ROOT / "scripts_bash" / "slurm_train.sh", "sample": ROOT / "scripts_bash" / "slurm_sample.sh"}
ALLOCATION = {"SLURM_JOB_ID": "4321", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:4",
              "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_SUBMIT_DIR": str(ROOT)}


def stand_ins(folder: Path, srun_exit: int = 0) -> Path:
    """srun and scontrol on PATH that record their command lines (srun with MASTER_ADDR and MASTER_PORT) in
    `folder`/calls.log; srun exits with `srun_exit`."""
    log = folder / "calls.log"
    (folder / "srun").write_text(f'#!/bin/sh\necho "srun $MASTER_ADDR:$MASTER_PORT $*" >> "{log}"\nexit {srun_exit}\n')
    (folder / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> "{log}"\n'
                                     'if [ "$1 $2" = "show hostnames" ]; then echo gpu07; echo gpu08; fi\n')
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    return log


def submit(kind: str, args, folder: Path, srun_exit: int = 0, **env):
    log = stand_ins(folder, srun_exit)
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **ALLOCATION,
                   "PATH": f"{folder}:{os.environ['PATH']}", **env}
    result = subprocess.run(["bash", str(SCRIPTS[kind]), *args], env=environment, cwd=folder, capture_output=True,
                            text=True, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("kind", SCRIPTS)
def test_help_says_how_to_submit(kind):
    result = subprocess.run(["bash", str(SCRIPTS[kind]), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: sbatch ") and f"scripts_bash/slurm_{kind}.sh" in lines[0]
    example = lines[lines.index("example:") + 1:]
    assert any(f"sbatch --nodes=2 --gpus-per-node=8" in line and f"slurm_{kind}.sh" in line for line in example)
    assert "docs/cluster.md" in result.stdout and "#SBATCH" not in result.stdout


TASK = "--kill-on-bad-exit=1 bash -c RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec \"$@\" task"


def test_training_runs_one_process_per_gpu_on_every_node(tmp_path):
    result, calls = submit("train", ["--config", "configs/rear_b.yaml", "--output_dir", "/shared/runs/b",
                                     "dataset.params.pretokenization=/shared/data/maskgitvq.jsonl"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls == [
        "scontrol show hostnames gpu[07-08]",
        f"srun gpu07:24321 --nodes=2 --ntasks-per-node=4 {TASK} python scripts/train_rear.py "
        "config=configs/rear_b.yaml experiment.output_dir=/shared/runs/b "
        "dataset.params.pretokenization=/shared/data/maskgitvq.jsonl",
    ]
    assert "job 4321 (start 0): 2 nodes x 4 GPUs, main process on gpu07:24321" in result.stdout


@pytest.mark.parametrize("srun_exit, requeued, exit_code", [(75, True, 0), (0, False, 0), (1, False, 1)])
def test_the_job_is_requeued_when_the_processes_stopped_with_their_work_saved(tmp_path, srun_exit, requeued,
                                                                             exit_code):
    result, calls = submit("sample", ["configs/rear_s.yaml", "reAR-S.safetensors", "sampling.seed=1"], tmp_path,
                           srun_exit, OUTPUT_DIR="/shared/samples/s", GPUS_PER_NODE="8", SLURM_RESTART_COUNT="2")
    assert result.returncode == exit_code
    assert calls[1] == (f"srun gpu07:24321 --nodes=2 --ntasks-per-node=8 {TASK} python scripts/sample_imagenet_rear.py"
                        " config=configs/rear_s.yaml experiment.generator_checkpoint=reAR-S.safetensors "
                        "experiment.output_dir=/shared/samples/s sampling.seed=1")
    assert calls[2:] == (["scontrol requeue 4321"] if requeued else [])
    assert ("requeueing job 4321" in result.stdout) == requeued and "(start 2)" in result.stdout


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_ID": ""}, "error: not inside a SLURM job: submit this script with sbatch (see --help)"),
    ({"SLURM_GPUS_PER_NODE": ""}, "error: no GPUs in the allocation: submit with --gpus-per-node=N (or set "
                                  "GPUS_PER_NODE)"),
])
def test_outside_a_job_or_without_gpus_it_says_so(tmp_path, env, message):
    result, calls = submit("train", [], tmp_path, **env)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == message
    assert not any(call.startswith("srun") for call in calls)


def test_sampling_without_a_checkpoint_is_a_usage_line(tmp_path):
    result, calls = submit("sample", ["configs/rear_s.yaml"], tmp_path)
    assert result.returncode == 2 and "usage: sbatch --nodes=N --gpus-per-node=G" in result.stderr and calls == []
