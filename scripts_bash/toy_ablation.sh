#!/usr/bin/env bash
# The toy consistency ablation on a CPU: plain AR (configs/ar_toy.yaml) and reAR (configs/rear_toy.yaml), same seed
# and steps, then re-tokenization consistency and exposure bias of both, side by side in OUT_DIR/table.md.
set -euo pipefail

usage() {
  cat <<USAGE
usage: bash scripts_bash/toy_ablation.sh [OUT_DIR] [key=value ...]

Trains the plain AR toy model (configs/ar_toy.yaml) and the toy reAR (configs/rear_toy.yaml) with the same seed and
steps, then measures both for re-tokenization consistency and exposure bias, side by side in OUT_DIR/table.md.

  OUT_DIR     where the runs go (default runs/toy_ablation): OUT_DIR/{ar_toy,rear_toy}/ hold each run, its held-out
              tokens, its eval_samples.npz, its consistency.{json,png} and exposure.{json,png}
  key=value   config overrides for every step of both runs, e.g. training.max_train_steps=300
              (sampling.num_samples sets the samples measured, default 1000)

  HELD_OUT_IMAGES  (environment) held-out toy images tokenized for the dataset baseline and exposure bias
                   (default 1000)
example:
  bash scripts_bash/toy_ablation.sh runs/toy_ablation
USAGE
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
out=${1:-runs/toy_ablation}
shift $(( $# > 0 ? 1 : 0 ))
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# Each step after training reads the run's config.yaml, which names the run's weights; every output lands in the run
# folder (eval_samples.npz, consistency.*, exposure.*), where evaluator.compare reads it.
for run in ar_toy rear_toy; do
  dir=$out/$run
  python "$repo/scripts/train_rear.py" config="$repo/configs/$run.yaml" experiment.output_dir="$dir" "$@"
  python "$repo/scripts/tokenize_toy.py" config="$dir/config.yaml" "$@" --output "$dir/held_out.jsonl" \
    --num-images "${HELD_OUT_IMAGES:-1000}"
  python "$repo/scripts/sample_imagenet_rear.py" config="$dir/config.yaml" sampling.num_samples=1000 "$@"
  python -m evaluator.consistency "$dir/eval_samples.npz" config="$dir/config.yaml" "$@" \
    --reference "$dir/held_out.jsonl"
  python -m evaluator.exposure config="$dir/config.yaml" "$@" --data "$dir/held_out.jsonl"
done
python -m evaluator.compare --run ar_toy="$out/ar_toy" --run rear_toy="$out/rear_toy" | tee "$out/table.md"
