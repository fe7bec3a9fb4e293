#!/bin/bash
# One node's part of a SLURM job, started by srun (one task per node) from slurm/*.sbatch:
#   accelerate launch --num_machines N --machine_rank <this node> ... -m deal_train ARGS...
# The machine rank is read here, on each node at run time (SLURM_PROCID of this node's only task), so every node
# gets its own rank. Needs ACCELERATE_CONFIG, NUM_MACHINES, NUM_PROCESSES (all nodes), MAIN_PROCESS_IP and
# MAIN_PROCESS_PORT in the environment (the sbatch scripts export them).
#
# Signals: the launcher ignores SIGUSR1 and SIGTERM (so it cannot die before the trainer has saved its
# checkpoint); the trainer processes install their own handlers. SIGUSR1/SIGTERM that reach this shell are passed
# on to the launcher and every process below it (found with pgrep -P, since torchrun starts each worker in a
# session of its own), i.e. every trainer process on this node.
set -euo pipefail
: "${ACCELERATE_CONFIG:?}" "${NUM_MACHINES:?}" "${NUM_PROCESSES:?}" "${MAIN_PROCESS_IP:?}" "${MAIN_PROCESS_PORT:?}"
MACHINE_RANK=${SLURM_PROCID:?launch_node.sh runs under srun (SLURM_PROCID is not set)}
echo "[deal_train] $(hostname): machine rank ${MACHINE_RANK} of ${NUM_MACHINES}," \
  "main process ${MAIN_PROCESS_IP}:${MAIN_PROCESS_PORT}" >&2
( trap '' USR1 TERM
  exec accelerate launch --quiet --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --num_processes "$NUM_PROCESSES" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m deal_train "$@" ) &
child=$!
descendants() { local p; for p in $(pgrep -P "$1" 2>/dev/null || true); do echo "$p"; descendants "$p"; done; }
forward() { kill -s "$1" "$child" $(descendants "$child") 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
while true; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
