#!/usr/bin/env bash
# usage: sbatch [--nodes=N --gpus-per-node=G ...] scripts_bash/slurm_sample.sh CONFIG CHECKPOINT [key=value ...]
#
# Sample 50k class-balanced images on a SLURM cluster (any number of nodes and GPUs), through preemptions.
# Submit from the repository's root (or set REAR_ROOT). Writes OUTPUT_DIR.npz (default runs/samples/<config name>),
# the same bytes for any number of processes; then score it: python -m evaluator REF.npz OUTPUT_DIR.npz. A
# preemption's SIGTERM (or SIGUSR1 from --signal before the time limit) ends each process after its batch in
# progress, its shards kept; the job is requeued and continues. OUTPUT_DIR must be on a file system every node
# shares (every process writes its shards there, the first one writes the .npz). See docs/cluster.md.
#
# example:
#   OUTPUT_DIR=/shared/samples/rear_s sbatch --nodes=2 --gpus-per-node=8 scripts_bash/slurm_sample.sh \
#       configs/rear_s.yaml reAR-S.safetensors
#SBATCH --job-name=rear-sample
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then awk 'NR > 1 && /^#SBATCH/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0; fi
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch --nodes=N --gpus-per-node=G $0 CONFIG CHECKPOINT [key=value ...] (see --help)" >&2
  exit 2
fi
config=$1 checkpoint=$2
shift 2
output_dir=${OUTPUT_DIR:-runs/samples/$(basename "$config" .yaml)}

# sbatch runs a copy of this script: the clone is where the job was submitted from
cd "${REAR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}}"
source scripts_bash/slurm_tasks.sh
run_tasks python scripts/sample_imagenet_rear.py config="$config" experiment.generator_checkpoint="$checkpoint" \
  experiment.output_dir="$output_dir" "$@"
