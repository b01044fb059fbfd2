#!/usr/bin/env bash
# The toy consistency ablation on a CPU: plain AR (configs/ar_toy.yaml) and reAR (configs/rear_toy.yaml), same seed
# and steps, then re-tokenization consistency and exposure bias of both, side by side in OUT_DIR/table.md.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 [OUT_DIR] [key=value ...]

  OUT_DIR     where the runs go (default runs/toy_ablation): OUT_DIR/{ar_toy,rear_toy}/ hold each run, its held-out
              tokens, its consistency.{json,png} and exposure.{json,png}; OUT_DIR/table.md the tables
  key=value   config overrides for every step of both runs, e.g. training.max_train_steps=300
              (sampling.num_samples sets the samples measured, default 1000)

  HELD_OUT_IMAGES  (environment) held-out toy images tokenized for the dataset baseline and exposure bias
                   (default 1000)
example:
  $0 runs/toy_ablation
USAGE
  exit 2
}

[[ ${1:-} == -h || ${1:-} == --help ]] && usage
out=${1:-runs/toy_ablation}
shift $(( $# > 0 ? 1 : 0 ))
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

for run in ar_toy rear_toy; do
  dir=$out/$run
  python "$repo/scripts/train_rear.py" config="$repo/configs/$run.yaml" experiment.output_dir="$dir" "$@"
  models=(config="$dir/config.yaml" experiment.tokenizer_checkpoint="$dir/tokenizer.safetensors"
          experiment.generator_checkpoint="$dir/generator.safetensors")
  python "$repo/scripts/tokenize_toy.py" "${models[@]}" "$@" --output "$dir/held_out.jsonl" \
    --num-images "${HELD_OUT_IMAGES:-1000}"
  python "$repo/scripts/sample_imagenet_rear.py" "${models[@]}" experiment.output_dir="${dir}_samples" \
    sampling.num_samples=1000 "$@"
  python -m evaluator.consistency "${dir}_samples.npz" "${models[@]}" "$@" --reference "$dir/held_out.jsonl" \
    --output "$dir/consistency"
  python -m evaluator.exposure "${models[@]}" "$@" --data "$dir/held_out.jsonl" --output "$dir/exposure"
done
python -m evaluator.compare --run ar_toy="$out/ar_toy" --run rear_toy="$out/rear_toy" | tee "$out/table.md"
