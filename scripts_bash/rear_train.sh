#!/usr/bin/env bash
# Train reAR with accelerate on one machine with 8 GPUs (or several machines).
#
#   bash scripts_bash/rear_train.sh [--config FILE] [--output_dir DIR] [--tracker wandb|tensorboard|none] [key=value ...]
#
# Each option may also come from the environment: CONFIG, OUTPUT_DIR, TRACKER; the launch from NUM_GPUS (per
# machine, default 8), NUM_MACHINES (1), MACHINE_RANK (0), MAIN_ADDR (127.0.0.1), MAIN_PORT (29500).
# Remaining arguments are config overrides, e.g. training.per_gpu_batch_size=128 training.gradient_accumulation_steps=2.
# A run started again with the same OUTPUT_DIR resumes from its newest checkpoint.
set -euo pipefail

usage() { sed -n '2,10p' "$0"; }
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
