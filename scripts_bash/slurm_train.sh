#!/usr/bin/env bash
# usage: sbatch [--nodes=N --gpus-per-node=G --time=T ...] scripts_bash/slurm_train.sh [--config FILE]
#            [--output_dir DIR] [--tracker wandb|tensorboard|none] [key=value ...]
#
# Train reAR on a SLURM cluster, on as many nodes and GPUs as the job is given, through preemptions and time limits.
# Submit from the repository's root (or set REAR_ROOT). One process per GPU (nodes x GPUs from the allocation), with
# the config's global batch whatever their number (training.global_batch_size). 300 s before the time limit SLURM
# sends SIGUSR1 (--signal); a preemption or scancel sends SIGTERM: the processes finish the step in progress, save a
# checkpoint and exit with 75, and the job is requeued (--requeue); the requeued job resumes from that checkpoint.
# The output folder must be on a file system every node shares. Options may come from the environment: CONFIG,
# OUTPUT_DIR, TRACKER, GPUS_PER_NODE, MASTER_PORT. See docs/cluster.md.
#
# example:
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 scripts_bash/slurm_train.sh \
#       --config configs/rear_s.yaml --output_dir /shared/runs/rear_s --tracker wandb
#SBATCH --job-name=rear-train
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

HELP=$(awk 'NR > 1 && /^#SBATCH/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}")
usage() { echo "$HELP"; }
# sbatch runs a copy of this script: the clone is where the job was submitted from
cd "${REAR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}}"
source scripts_bash/train_options.sh
source scripts_bash/slurm_tasks.sh
run_tasks python scripts/train_rear.py "${TRAIN_ARGS[@]}"
