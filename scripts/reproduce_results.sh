#!/usr/bin/env bash
# The small-budget results page from scratch (64 training / 32 test rows per task; docs/results.md itself is made
# from the paper-budget runs in results/, scripts/paper_table.sh), in one command:
#
#     scripts/reproduce_results.sh
#
# 1. The table: every method on benchmark=standard, orders 1, 2 and 3, at ONE budget shared by all methods and
#    orders (the variables below), one `python -m deal_train.compare --methods <method>` invocation per
#    (order, method) into $RESULTS_ROOT/standard_order<k>/<method>/.
# 2. The data-efficiency curve: deal and seq_lora on benchmark=tc with 50, 100, 200 and 400 training rows per task
#    (the same test rows) into $RESULTS_ROOT/tc_rows<n>/<method>/.
# 3. `python -m deal_train.results`, which writes $RESULTS_DOC and its figures from the runs' metrics.json.
#
# Resumable: a finished run with the same settings is read back, not rerun, and a partial one resumes after its last
# finished task (deal_train.compare does both), so the script can be stopped (Ctrl-C, or SIGTERM: the running
# trainings save a checkpoint first) and started again, in another session, with the same command. Each invocation's
# wall time and exit code go to $RESULTS_ROOT/reproduce.log (tab-separated: start (UTC), seconds, exit code, label,
# command), its output to $RESULTS_ROOT/logs/<label>.log.
#
# Environment knobs (defaults in brackets):
#   RESULTS_ROOT [outputs/results]  where the runs go     RESULTS_DOC [$RESULTS_ROOT/results.md]  the page to write
#   RESULTS_JOBS [1]   compare invocations run in parallel (each with OMP_NUM_THREADS=1 unless set)
#   RESULTS_ONLY [all] table | curve | all                   RESULTS_DRY_RUN [0]  1: print the commands, run nothing
#   MODEL, TRAIN_ROWS, TEST_ROWS, ORDERS, METHODS, CURVE_METHODS, CURVE_ROWS, CURVE_TEST_ROWS: the budget below;
#   EXTRA_ARGS: more options for every compare command (e.g. a smoke check on the tiny model:
#     MODEL=tiny-random-llama TRAIN_ROWS=4 TEST_ROWS=2 CURVE_ROWS="4 8" EXTRA_ARGS="--max_new_tokens 3" ...).
# Time: measured 6.5 hours of run time on 2 CPU cores, about 3.5 hours of wall time with RESULTS_JOBS=2 (README "Results").
set -euo pipefail
cd "$(dirname "$0")/.."

# --- the budget: one for every method and order ------------------------------------------------------------------
MODEL="${MODEL:-smollm2-135m-instruct}"
TRAIN_ROWS="${TRAIN_ROWS:-64}"            # training rows per task (8 optimizer steps of 8)
TEST_ROWS="${TEST_ROWS:-32}"              # test rows per task (one row = 3.1 points of a task's accuracy)
ORDERS="${ORDERS:-1 2 3}"
METHODS="${METHODS:-deal seq_lora o_lora per_task replay ewc lwf osf}"
CURVE_METHODS="${CURVE_METHODS:-deal seq_lora}"
CURVE_ROWS="${CURVE_ROWS:-50 100 200 400}"
CURVE_TEST_ROWS="${CURVE_TEST_ROWS:-$TEST_ROWS}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
TABLE_CONFIG=configs/standard_order1_smollm2.yaml   # orders via --order
CURVE_CONFIG=configs/tc_smollm2.yaml
COMMON_ARGS="--model $MODEL --eval_zero_shot false"

RESULTS_ROOT="${RESULTS_ROOT:-outputs/results}"
RESULTS_DOC="${RESULTS_DOC:-$RESULTS_ROOT/results.md}"
RESULTS_JOBS="${RESULTS_JOBS:-1}"
RESULTS_ONLY="${RESULTS_ONLY:-all}"
RESULTS_DRY_RUN="${RESULTS_DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

case "$RESULTS_ONLY" in table|curve|all) ;; *)
    echo "error: RESULTS_ONLY=$RESULTS_ONLY: use table, curve or all." >&2; exit 2 ;; esac
if ! [[ "$RESULTS_JOBS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: RESULTS_JOBS=$RESULTS_JOBS: give a whole number >= 1." >&2; exit 2
fi
comma() { echo "$*" | tr ' ' ','; }

# --- the runs: one label and one command per (order or curve point, method) --------------------------------------
LABELS=()
COMMANDS=()
if [[ "$RESULTS_ONLY" != curve ]]; then
    for order in $ORDERS; do
        for method in $METHODS; do
            LABELS+=("standard_order$order/$method")
            COMMANDS+=("$PYTHON -m deal_train.compare --config $TABLE_CONFIG --order $order $COMMON_ARGS --max_train_samples $TRAIN_ROWS --max_test_samples $TEST_ROWS --methods $method --output_dir $RESULTS_ROOT/standard_order$order $EXTRA_ARGS")
        done
    done
fi
if [[ "$RESULTS_ONLY" != table ]]; then
    for rows in $CURVE_ROWS; do
        for method in $CURVE_METHODS; do
            LABELS+=("tc_rows$rows/$method")
            COMMANDS+=("$PYTHON -m deal_train.compare --config $CURVE_CONFIG --benchmark tc $COMMON_ARGS --max_test_samples $CURVE_TEST_ROWS --max_train_samples $rows --methods $method --output_dir $RESULTS_ROOT/tc_rows$rows $EXTRA_ARGS")
        done
    done
fi
GENERATE="$PYTHON -m deal_train.results --runs $RESULTS_ROOT --output $RESULTS_DOC --methods $(comma $METHODS) --orders $(comma $ORDERS) --curve_methods $(comma $CURVE_METHODS) --curve_rows $(comma $CURVE_ROWS)"

if [[ "$RESULTS_DRY_RUN" == 1 ]]; then
    for i in "${!LABELS[@]}"; do echo "run ${LABELS[$i]}: ${COMMANDS[$i]}"; done
    echo "then: $GENERATE"
    exit 0
fi

LOG="$RESULTS_ROOT/reproduce.log"
mkdir -p "$RESULTS_ROOT/logs"
SETTINGS="MODEL=$MODEL TRAIN_ROWS=$TRAIN_ROWS TEST_ROWS=$TEST_ROWS ORDERS='$ORDERS' METHODS='$METHODS' CURVE_METHODS='$CURVE_METHODS' CURVE_ROWS='$CURVE_ROWS' CURVE_TEST_ROWS=$CURVE_TEST_ROWS EXTRA_ARGS='$EXTRA_ARGS' RESULTS_JOBS=$RESULTS_JOBS RESULTS_ONLY=$RESULTS_ONLY scripts/reproduce_results.sh"

now_ms() { date +%s%3N; }
log_line() {  # start_utc seconds exit_code label command
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$LOG"
}

# One compare invocation; its wall time and exit code go to the log. SIGTERM is passed on to the trainer, which
# saves a checkpoint and exits 143 (Ctrl-C reaches it directly: it is in the terminal's process group).
run_one() {
    local label="$1" command="$2" start_utc start rc child
    local out="$RESULTS_ROOT/logs/${label//\//-}.log"
    trap '' INT  # Ctrl-C: the trainer gets it itself; this subshell must live on to log the exit code
    start_utc="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    start="$(now_ms)"
    echo "[$(date +%H:%M:%S)] start $label  (output: $out)"
    # shellcheck disable=SC2086  # the command is a word list on purpose
    $command > "$out" 2>&1 &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM
    rc=0
    wait "$child" || rc=$?
    while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done
    local seconds
    seconds="$(awk -v ms="$(( $(now_ms) - start ))" 'BEGIN { printf "%.1f", ms / 1000 }')"
    log_line "$start_utc" "$seconds" "$rc" "$label" "$command"
    echo "$rc" > "$RESULTS_ROOT/logs/${label//\//-}.rc"
    echo "[$(date +%H:%M:%S)] done  $label  exit $rc, ${seconds} s"
}

STOP=0
on_signal() { STOP=$1; for pid in $(jobs -p); do kill -TERM "$pid" 2>/dev/null || true; done; }
# Ctrl-C reaches the trainers first (same process group); the TERM that follows only makes sure that ones still
# loading stop too (a second SIGINT, not a TERM, is what makes a trainer skip its checkpoint). Nothing new starts.
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
SESSION_START_UTC="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
SESSION_START="$(now_ms)"

echo "Reproducing $RESULTS_DOC: ${#LABELS[@]} run(s) into $RESULTS_ROOT, $RESULTS_JOBS at a time; log $LOG"
for i in "${!LABELS[@]}"; do
    [[ "$STOP" != 0 ]] && break
    while (( $(jobs -rp | wc -l) >= RESULTS_JOBS )); do wait -n || true; [[ "$STOP" != 0 ]] && break 2; done
    rm -f "$RESULTS_ROOT/logs/${LABELS[$i]//\//-}.rc"
    run_one "${LABELS[$i]}" "${COMMANDS[$i]}" &
done
while (( $(jobs -rp | wc -l) > 0 )); do wait || true; done

# Each order's comparison.md / .png with every method, once they have all finished (read back, nothing reruns).
if [[ "$STOP" == 0 && "$RESULTS_ONLY" != curve ]]; then
    for order in $ORDERS; do
        all=1
        for method in $METHODS; do
            grep -qs '"finished": true' "$RESULTS_ROOT/standard_order$order/$method/metrics.json" || all=0
        done
        if [[ "$all" == 1 ]]; then
            # shellcheck disable=SC2086
            $PYTHON -m deal_train.compare --config $TABLE_CONFIG --order "$order" $COMMON_ARGS \
                --max_train_samples "$TRAIN_ROWS" --max_test_samples "$TEST_ROWS" --methods "$(comma $METHODS)" \
                --output_dir "$RESULTS_ROOT/standard_order$order" $EXTRA_ARGS \
                > "$RESULTS_ROOT/logs/standard_order$order-comparison.log" 2>&1 \
                || echo "comparison of order $order failed: see $RESULTS_ROOT/logs/standard_order$order-comparison.log"
        fi
    done
fi

session_seconds="$(awk -v ms="$(( $(now_ms) - SESSION_START ))" 'BEGIN { printf "%.1f", ms / 1000 }')"
log_line "$SESSION_START_UTC" "$session_seconds" "$STOP" session "$SETTINGS"

failed=()
for label in "${LABELS[@]}"; do
    rc_file="$RESULTS_ROOT/logs/${label//\//-}.rc"
    if [[ -f "$rc_file" && "$(cat "$rc_file")" != 0 ]]; then failed+=("$label (exit $(cat "$rc_file"))"); fi
done
if [[ "$STOP" != 0 ]]; then
    echo "Stopped; rerun the same command to continue (finished runs are read back, partial ones resume)."
    exit "$STOP"
fi
echo "Writing $RESULTS_DOC"
# shellcheck disable=SC2086
$GENERATE
if (( ${#failed[@]} )); then
    printf 'Failed (see %s/logs/): %s\n' "$RESULTS_ROOT" "${failed[*]}" >&2
    exit 1
fi
echo "Done in ${session_seconds} s."
