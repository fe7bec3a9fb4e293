# Shared by slurm/single_node.sbatch and slurm/multi_node.sbatch (sourced, not run).
#
# deal_train_srun ARGS...: start slurm/launch_node.sh once per node with srun and wait for it. When SLURM's
# time-limit warning arrives (#SBATCH --signal=B:USR1@<seconds> sends USR1 to this batch shell), the signal is
# passed on to srun, which forwards it to every node's launch_node.sh; the trainer saves a step checkpoint and
# stops, and the job is requeued with `scontrol requeue`. The requeued job runs the same command, which resumes
# from the checkpoint. SIGTERM (scancel, preemption) is passed on the same way, without a requeue.
# Arguments are passed through as words ("$@"), never evaluated by a shell.

deal_train_srun() {
  DEAL_TRAIN_REQUEUE=0
  srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 bash slurm/launch_node.sh "$@" &
  DEAL_TRAIN_SRUN_PID=$!
  trap 'DEAL_TRAIN_REQUEUE=1
        echo "[deal_train] $(date +%T) time-limit warning (SIGUSR1): checkpoint, stop, requeue" >&2
        kill -USR1 "$DEAL_TRAIN_SRUN_PID" 2>/dev/null || true' USR1
  trap 'kill -TERM "$DEAL_TRAIN_SRUN_PID" 2>/dev/null || true' TERM
  local status=0
  while true; do
    wait "$DEAL_TRAIN_SRUN_PID" && status=0 || status=$?
    # a trapped signal interrupts `wait`; wait again until srun has really finished
    kill -0 "$DEAL_TRAIN_SRUN_PID" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ "$DEAL_TRAIN_REQUEUE" = 1 ] && [ "$status" != 0 ]; then
    echo "[deal_train] requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint" >&2
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  return "$status"
}
