# Sourced by scripts_bash/slurm_train.sh and slurm_sample.sh (not run by itself).
#
# run_tasks COMMAND...: COMMAND as one process per GPU on every node of the SLURM allocation, started by srun (so
# that SLURM's signals reach every process directly), with torch.distributed's environment made from SLURM's: RANK,
# LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (the first node), MASTER_PORT. When the processes stopped on a signal with
# their work saved (exit code 75: the time limit's SIGUSR1 from `--signal`, or a preemption's SIGTERM), the job is
# requeued, and the requeued job continues where it stopped. Any other failure ends the job with its code.

gpus_per_node() {
  # GPUS_PER_NODE, else the allocation's: SLURM_GPUS_ON_NODE, or the count in SLURM_GPUS_PER_NODE ("8", "h100:8")
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
  if [[ -z $gpus ]]; then
    echo "error: no GPUs in the allocation: submit with --gpus-per-node=N (or set GPUS_PER_NODE)" >&2
    return 2
  fi
  echo "${gpus##*:}"
}

run_tasks() {
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: not inside a SLURM job: submit this script with sbatch (see --help)" >&2
    return 2
  fi
  local nodes=${SLURM_NNODES:-1} gpus status
  gpus=$(gpus_per_node)
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  echo "job $SLURM_JOB_ID (start ${SLURM_RESTART_COUNT:-0}): $nodes nodes x $gpus GPUs, main process on" \
    "$MASTER_ADDR:$MASTER_PORT"
  set +e
  srun --nodes="$nodes" --ntasks-per-node="$gpus" --kill-on-bad-exit=1 \
    bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec "$@"' task "$@"
  status=$?
  set -e
  if [[ $status -eq 75 ]]; then
    echo "stopped with its work saved: requeueing job $SLURM_JOB_ID to continue"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$status"
}
