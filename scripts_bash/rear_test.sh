#!/usr/bin/env bash
# Sample 50k class-balanced images with a generator checkpoint, then score them with the ADM evaluator.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 CONFIG CHECKPOINT NUM_GPUS REF_BATCH [key=value ...]

  CONFIG      generator config, e.g. configs/rear_s.yaml
  CHECKPOINT  generator weights: a local file or a released name (reAR-S.safetensors, fetched from qyoo/reAR)
  NUM_GPUS    processes for torchrun (one per GPU)
  REF_BATCH   the ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  key=value   more config overrides, e.g. sampling.guidance_scale=20.0 sampling.per_proc_batch_size=64

  OUTPUT_DIR  (environment) where the samples go; default runs/samples/<config name>. Writes OUTPUT_DIR.npz.
              Rerunning the same command continues an interrupted run.
example:
  $0 configs/rear_s.yaml reAR-S.safetensors 8 VIRTUAL_imagenet256_labeled.npz
USAGE
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
[[ $# -ge 4 ]] || { usage >&2; exit 2; }
config=$1 checkpoint=$2 num_gpus=$3 ref_batch=$4
shift 4
output_dir=${OUTPUT_DIR:-runs/samples/$(basename "$config" .yaml)}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

torchrun --standalone --nproc_per_node="$num_gpus" "$repo/scripts/sample_imagenet_rear.py" \
  config="$config" experiment.generator_checkpoint="$checkpoint" experiment.output_dir="$output_dir" "$@"
python -m evaluator "$ref_batch" "$output_dir.npz"
