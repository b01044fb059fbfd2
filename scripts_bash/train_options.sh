# Sourced by scripts_bash/rear_train.sh and slurm_train.sh (not run by itself): their options into TRAIN_ARGS, the
# arguments of scripts/train_rear.py. --config FILE, --output_dir DIR and --tracker NAME (or CONFIG, OUTPUT_DIR,
# TRACKER from the environment); -h / --help calls the sourcing script's `usage`; everything else is a config
# override (key.sub=value).

CONFIG=${CONFIG:-configs/rear_s.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-}
TRACKER=${TRACKER:-}
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG=$2; shift 2 ;;
    --output_dir) OUTPUT_DIR=$2; shift 2 ;;
    --tracker) TRACKER=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
OUTPUT_DIR=${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}
TRAIN_ARGS=("config=$CONFIG" "experiment.output_dir=$OUTPUT_DIR")
if [[ -n "$TRACKER" ]]; then TRAIN_ARGS+=("experiment.tracker=$TRACKER"); fi
TRAIN_ARGS+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
