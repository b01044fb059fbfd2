#!/usr/bin/env bash
# A checkpoint's whole evaluation: sample 50k class-balanced images with torchrun, then one results folder with the
# ADM metrics, consistency (and exposure bias, given held-out tokens), the settings, the commit, and report.md.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 CONFIG CHECKPOINT NUM_GPUS REF_BATCH [key=value ...]

  CONFIG      generator config, e.g. configs/rear_s.yaml (a toy run's own RUN/config.yaml)
  CHECKPOINT  generator weights: a local file or a released name (reAR-S.safetensors, fetched from qyoo/reAR)
  NUM_GPUS    processes for torchrun (one per GPU)
  REF_BATCH   the ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  key=value   more config overrides, e.g. sampling.guidance_scale=20.0 sampling.per_proc_batch_size=64

  environment (all optional):
  OUTPUT_DIR          the results folder; default runs/eval/<config name>. The samples go to OUTPUT_DIR/samples.npz
                      (rerunning the same command continues an interrupted run); report.md, report.json,
                      metrics.json, consistency.*, exposure.* and the figures beside them
  HELD_OUT            held-out tokens (.jsonl, or a reference .npz with tokens from python -m evaluator.reconstruction
                      --write-reference): the consistency baseline and exposure bias
  INCEPTION_WEIGHTS   the Inception weights file, if it is not in the torch hub cache
  REPORT_FLAGS        more flags for the report (split at spaces), e.g. "--search runs/search/rear_s
                      --reconstruction runs/recon/maskgit --limit 10000" (see python -m evaluator.report --help)
example:
  $0 configs/rear_s.yaml reAR-S.safetensors 8 VIRTUAL_imagenet256_labeled.npz
USAGE
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
[[ $# -ge 4 ]] || { usage >&2; exit 2; }
config=$1 checkpoint=$2 num_gpus=$3 ref_batch=$4
shift 4
out=${OUTPUT_DIR:-runs/eval/$(basename "$config" .yaml)}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

torchrun --standalone --nproc_per_node="$num_gpus" "$repo/scripts/sample_imagenet_rear.py" \
  config="$config" experiment.generator_checkpoint="$checkpoint" experiment.output_dir="$out/samples" "$@"
# shellcheck disable=SC2086  # REPORT_FLAGS is a list of flags
python -m evaluator.report "$out/samples.npz" config="$config" experiment.generator_checkpoint="$checkpoint" "$@" \
  --ref "$ref_batch" --output "$out" ${HELD_OUT:+--held-out "$HELD_OUT"} \
  ${INCEPTION_WEIGHTS:+--inception-weights "$INCEPTION_WEIGHTS"} ${REPORT_FLAGS:-}
