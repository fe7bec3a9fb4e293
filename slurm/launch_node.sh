#!/bin/bash
# One node's part of a SLURM job, started by srun (one task per node) from slurm/*.sbatch:
#   accelerate launch --num_machines N --machine_rank <this node> ... -m deal_train ARGS...
# The machine rank is read here, on each node at run time (SLURM_PROCID of this node's only task), so every node
# gets its own rank. Needs ACCELERATE_CONFIG, NUM_MACHINES, NUM_PROCESSES (all nodes), MAIN_PROCESS_IP and
# MAIN_PROCESS_PORT in the environment (the sbatch scripts export them).
#
# Signals: the launcher ignores SIGUSR1 and SIGTERM (so it cannot die before the trainer has saved its
# checkpoint); the trainer installs its own handlers. SIGUSR1/SIGTERM that reach this shell are passed on to the
# launcher's whole process group, i.e. every trainer process on this node.
set -euo pipefail
: "${ACCELERATE_CONFIG:?}" "${NUM_MACHINES:?}" "${NUM_PROCESSES:?}" "${MAIN_PROCESS_IP:?}" "${MAIN_PROCESS_PORT:?}"
MACHINE_RANK=${SLURM_PROCID:?launch_node.sh runs under srun (SLURM_PROCID is not set)}
echo "[deal_train] $(hostname): machine rank ${MACHINE_RANK} of ${NUM_MACHINES}," \
  "main process ${MAIN_PROCESS_IP}:${MAIN_PROCESS_PORT}" >&2
set -m  # the launcher gets a process group of its own, so one kill reaches it and all its workers
( trap '' USR1 TERM
  exec accelerate launch --quiet --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --num_processes "$NUM_PROCESSES" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m deal_train "$@" ) &
child=$!
trap 'kill -USR1 -- "-$child" 2>/dev/null || true' USR1
trap 'kill -TERM -- "-$child" 2>/dev/null || true' TERM
status=0
while true; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
