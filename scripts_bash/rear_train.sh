#!/usr/bin/env bash
# Train reAR with accelerate on one machine with 8 GPUs (or several machines): see usage below.
set -euo pipefail

usage() {
  cat <<USAGE
usage: bash scripts_bash/rear_train.sh [--config FILE] [--output_dir DIR] [--tracker wandb|tensorboard|none]
                                       [key=value ...]

Trains with accelerate launch scripts/train_rear.py, one process per GPU.

  --config FILE      the training config (default configs/rear_s.yaml; environment: CONFIG)
  --output_dir DIR   where the run goes (default runs/<config name>; environment: OUTPUT_DIR)
  --tracker NAME     wandb, tensorboard, swanlab or none (default: the config's; environment: TRACKER)
  key=value          config overrides, e.g. training.per_gpu_batch_size=128 training.gradient_accumulation_steps=2

  The launch comes from the environment: NUM_GPUS (per machine, default 8), NUM_MACHINES (1), MACHINE_RANK (0),
  MAIN_ADDR (127.0.0.1), MAIN_PORT (29500). A run started again with the same output folder resumes from its
  newest checkpoint. On a SLURM cluster use slurm_train.sh (docs/cluster.md).
example:
  bash scripts_bash/rear_train.sh --config configs/rear_s.yaml --output_dir runs/rear_s --tracker wandb
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/train_options.sh"

NUM_GPUS=${NUM_GPUS:-8}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}

cd "$(dirname "$0")/.."

PROCESSES=$((NUM_GPUS * NUM_MACHINES))
MULTI=()
if [[ $PROCESSES -gt 1 ]]; then MULTI=(--multi_gpu); fi

exec accelerate launch \
  ${MULTI[@]+"${MULTI[@]}"} \
  --num_machines "$NUM_MACHINES" \
  --num_processes "$PROCESSES" \
  --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_ADDR" \
  --main_process_port "$MAIN_PORT" \
  scripts/train_rear.py "${TRAIN_ARGS[@]}"
