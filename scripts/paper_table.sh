#!/usr/bin/env bash
# The paper-budget table (issue 21): order 1 for every method in METHODS1, orders 2 and 3 for METHODS23, each run
# in its own folder $RUNS_ROOT/standard_order<k>/<method> with configs/paper_budget_smollm2_order<k>.yaml. Rerun the
# same command after an interruption: a finished run is skipped, an unfinished one resumes after its last finished
# task (the trainer's own resume). After each finished run its metrics.json and per-row predictions (gzipped) are
# copied to $RESULTS_DIR/standard_order<k>/<method>/ (committed files; docs/results.md is generated from them:
#   python -m deal_train.results --runs results --output docs/results.md, which this script runs at its end).
# A machine stopped mid-run loses its outputs/ folder: `scripts/paper_table.sh save` copies the finished tasks of
# every unfinished run to $RESULTS_DIR/partial/standard_order<k>/<method>/ (commit that folder); a later run of this
# script on any machine restores such a copy before the run, resumes after its last finished task, and deletes the
# copy once the run has finished (deal_train/tools/partial_runs.py).
# Environment: RUNS_ROOT [outputs/paper_table], RESULTS_DIR [results], METHODS1, METHODS23, ORDERS23 ["2 3"] (set
#   but empty: none, e.g. METHODS1="" METHODS23=deal ORDERS23=2 runs order 2 of deal only),
#   CONFIG_PREFIX [configs/paper_budget_smollm2_order], EXTRA_ARGS (more trainer options, e.g. a tiny smoke check:
#   EXTRA_ARGS="--model tiny-random-llama --max_train_samples 4 --max_test_samples 3 --max_new_tokens 3").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUNS_ROOT="${RUNS_ROOT:-outputs/paper_table}"
RESULTS_DIR="${RESULTS_DIR:-results}"
METHODS1="${METHODS1-deal seq_lora o_lora osf per_task replay ewc lwf}"
METHODS23="${METHODS23-deal seq_lora o_lora osf replay}"
ORDERS23="${ORDERS23-2 3}"
CONFIG_PREFIX="${CONFIG_PREFIX:-configs/paper_budget_smollm2_order}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
failed=0

if [ "${1:-}" = save ]; then
    exec "$PYTHON" -m deal_train.tools.partial_runs save --runs_root "$RUNS_ROOT" --results_dir "$RESULTS_DIR"
fi

finished() {  # a metrics.json that says finished
    [ -f "$1" ] && "$PYTHON" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("finished") else 1)' "$1"
}

run() {  # order method
    local k=$1 m=$2 run_dir="$RUNS_ROOT/standard_order$1/$2" dest="$RESULTS_DIR/standard_order$1/$2"
    if finished "$dest/metrics.json"; then echo "done already: $dest"; return 0; fi
    local saved="$RESULTS_DIR/partial/standard_order$k/$m"
    if [ -d "$saved" ] && ! "$PYTHON" -m deal_train.tools.partial_runs restore --saved "$saved" --run_dir "$run_dir"; then
        echo "FAILED: order $k $m (cannot restore $saved)"; failed=1; return 0
    fi
    echo "running: order $k $m -> $run_dir"
    # shellcheck disable=SC2086
    if ! "$PYTHON" -m deal_train --config "$CONFIG_PREFIX$k.yaml" --method "$m" --output_dir "$run_dir" $EXTRA_ARGS; then
        echo "FAILED: order $k $m (rerun this script to resume)"; failed=1; return 0
    fi
    finished "$run_dir/metrics.json" || { echo "not finished: $run_dir"; failed=1; return 0; }
    "$PYTHON" -m deal_train.tools.partial_runs finished --run_dir "$run_dir" --dest "$dest" && rm -rf "$saved"
}

page() {  # docs/results.md from the finished runs in $RESULTS_DIR (only for the default results folder)
    [ "$RESULTS_DIR" = results ] || return 0
    "$PYTHON" -m deal_train.results --runs results --output docs/results.md || echo "FAILED: docs/results.md"
}

for m in $METHODS1; do run 1 "$m"; done
for k in $ORDERS23; do for m in $METHODS23; do run "$k" "$m"; done; done
page
exit $failed
