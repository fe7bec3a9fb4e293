"""The documented search behind DEAL's default settings: staged sweeps on the validation split.

    python scripts/search_deal_defaults.py [--round 1|2] [--output_dir DIR] [--stages 1,2,3] [--key value ...]

Every stage is one ``deal_train.tools.sweep`` grid run with the settings fixed so far; the stage's best point (highest
validation average accuracy, ties broken by backward transfer) fixes its keys for the later stages. Reference
methods (SeqLoRA, O-LoRA) run once on the same split and budget. Runs already finished are read back, so a rerun
only adds what is missing and an interrupted search resumes. At the end ``docs/deal_defaults.md`` is written from
the sweeps' own ``sweep.json`` files: the budget, every stage's table, and the winner as a JSON block that
``tests/test_deal_defaults.py`` checks against ``TrainConfig``'s defaults.

Scoring is on ``eval_split: validation`` (rows carved from the training files), never on the test split.

Round 1 (``docs/deal_defaults.md``) found today's defaults at a small budget where nothing was forgotten. Round 2
(``--round 2``, ``docs/deal_defaults_round2.md``, issue "DEAL round 2") starts from those defaults and searches the
retention switches (docs/design.md 3.1-3.4) at a budget where SeqLoRA does forget: standard order 1 with 300
training rows per task and the 100-row validation carve, about 25 minutes per point on one core.

A round-2 search outlives a machine: ``--save`` copies the ``metrics.json`` of every finished point into
``results/deal_search_round2/`` (committed; a few KB each) and exits, and every round-2 invocation first copies
those back into its output folder, where the sweep reads them back instead of rerunning. Points of a stage can run
in parallel processes with ``python -m deal_train.sweep`` into ``<output_dir>/stage<i>`` (and ``reference``) with
the round's budget; this script then reads them back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deal_train.cli import build_parser, config_from_args, quiet_libraries  # noqa: E402
from deal_train.outputs import format_pct  # noqa: E402
from deal_train.outputs import atomic_write_text  # noqa: E402
from deal_train.tools.sweep import parse_grid, sweep  # noqa: E402

BUDGET = ["--config", "configs/tc_smollm2.yaml", "--max_train_samples", "64", "--validation_rows", "32",
          "--eval_split", "validation", "--eval_zero_shot", "false"]
"""The search budget on 2 CPU cores: tc (dbpedia → yahoo → agnews), 64 training rows per task (8 steps of 8),
32 validation rows per task; about 6 minutes per point when the machine is otherwise idle."""

REFERENCE_GRID = ["method=seq_lora"]

STAGES: list[tuple[str, list[str]]] = [
    ("Plasticity and retention: residual update x drift penalty",
     ["deal_residual_update=false,true", "deal_lambda_drift=0,0.1,1"]),
    ("DEAL learning rate (filter and MLP) relative to LoRA's 3e-4", ["deal_learning_rate=1e-4,3e-4"]),
    ("Weaker drift penalty (it sums over all 120 factors of SmolLM2's q, v adapter)",
     ["deal_lambda_drift=0.003,0.01,0.03"]),
    ("Regulariser target and weights (Table 2's a, b at our delta form)",
     ["deal_reg_target=raw", "deal_lambda_retention=0.01,0.1"]),
]
"""(title, --grid specs). Stage 1 includes the paper's own point (no residual, no drift)."""

DOC = os.path.join("docs", "deal_defaults.md")

BUDGET_ROUND2 = ["--config", "configs/paper_budget_smollm2_order1.yaml", "--max_train_samples", "300",
                 "--eval_split", "validation", "--eval_zero_shot", "false"]
"""Round 2: the paper-budget config (standard order 1, 100 validation rows per task) at 300 training rows per task,
where sequential training forgets; about 25 minutes per point on one core with the fast path."""

STAGES_ROUND2: list[tuple[str, list[str]]] = [
    ("A new rank-r adapter per task, orthogonal to the history's input directions (docs/design.md 3.4)",
     ["deal_grow_adapter=false,true"]),
    ("The residual R on the filtered history, with or without the growing adapter",
     ["deal_residual_update=true,false"]),
    ("Residual (and MLP correction) projected off the history's top-k directions (energy 0.95)",
     ["deal_project_residual=none,A,B,both"]),
    ("Drift penalty weighted by the history's singular values", ["deal_drift_weighting=flat,spectral"]),
    ("Separate drift weight on the filtered history (the residual keeps deal_lambda_drift)",
     ["deal_lambda_drift_history=0.03,0.3"]),
]
"""Round 2's stages (docs/design.md 3.1-3.4); every switch is off in round 1's winner, so its first row is the
incumbent."""

KEEP_ROUND2 = os.path.join("results", "deal_search_round2")
"""Where ``--save`` keeps the finished round-2 points' metrics (relative to the repository root)."""


def copy_finished(src_root: str, dst_root: str) -> list[str]:
    """Copy ``<src_root>/<folder>/<point>/metrics.json`` of every finished run to the same place under ``dst_root``
    where that place holds no finished run yet (written atomically). Returns the copied relative paths."""
    copied = []
    if not os.path.isdir(src_root):
        return copied
    for folder in sorted(os.listdir(src_root)):
        if not os.path.isdir(os.path.join(src_root, folder)):
            continue
        for point in sorted(os.listdir(os.path.join(src_root, folder))):
            rel = os.path.join(folder, point, "metrics.json")
            src, dst = os.path.join(src_root, rel), os.path.join(dst_root, rel)
            if not os.path.isfile(src):
                continue
            with open(src, encoding="utf-8") as fh:
                text = fh.read()
            if not json.loads(text).get("finished"):
                continue
            if os.path.isfile(dst):
                with open(dst, encoding="utf-8") as fh:
                    if json.load(fh).get("finished"):
                        continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            atomic_write_text(dst, text)
            copied.append(rel)
    return copied


ROUNDS = {1: (BUDGET, STAGES, REFERENCE_GRID, DOC, os.path.join("outputs", "deal_search")),
          2: (BUDGET_ROUND2, STAGES_ROUND2, ["method=seq_lora,o_lora"], os.path.join("docs", "deal_defaults_round2.md"),
              os.path.join("outputs", "deal_search_round2"))}
"""round -> (budget, stages, reference grid, report, default output folder)."""


def best_point(points: list[dict]) -> dict:
    """The point with the highest average accuracy; ties go to the higher backward transfer, then to the earlier
    point in ``points``."""
    return max(points, key=lambda p: (p["average_accuracy"], p["backward_transfer"] or 0.0))


def stage_table(title: str, result: dict, incumbent: dict | None, cfg) -> str:
    """One stage's Markdown table; the incumbent (best so far, with this stage's keys at their current values)
    comes first."""
    keys = list(result["grid"])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " | validation AA | BWT | train ms/sample (tasks 2+) | "
             "trainable params (tasks 2+) | wall |", "|" + "---|" * len(keys) + "---:|---:|---:|---:|---:|"]
    rows = list(result["points"])
    if incumbent is not None:
        rows = [{**incumbent, "settings": {k: f"{getattr(cfg, k)} (best so far)" for k in keys}}] + rows
    for r in rows:
        per_sample = r["later_train_seconds_per_sample"]
        lines.append("| " + " | ".join(str(r["settings"][k]) for k in keys) + f" | {format_pct(r['average_accuracy'])}"
                     f" | {format_pct(r['backward_transfer'], True)} | "
                     f"{'n/a' if per_sample is None else f'{1000 * per_sample:.0f}'} | "
                     f"{r['later_trainable_parameters'] or 0:,} | {r['wall_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def mechanism_table(runs: list[tuple[str, str]]) -> str:
    """Per run: how far each later task moved the adapter (relative Frobenius change of ΔW = BA, and of A and B)
    next to the forgetting it caused (drop of each earlier task's accuracy over that task)."""
    lines = ["| run | task | ΔW moved | A moved | B moved | accuracy change of earlier tasks over this task |",
             "|---|---|---:|---:|---:|---|"]
    for label, out in runs:
        with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
            m = json.load(fh)
        acc = m["accuracy_matrix"]
        for t, p in enumerate(m["per_task"]):
            if t == 0 or "relative_change" not in p:
                continue
            ch = p["relative_change"]
            drops = ", ".join(f"{m['tasks'][i]} {acc[i][t] - acc[i][t - 1]:+.1f}" for i in range(t))
            moved = ["n/a" if ch.get(k) is None else f"{100 * ch[k]:.0f}%" for k in ("delta_w", "A", "B")]
            lines.append(f"| {label} | {t + 1} {p['task']} | {' | '.join(moved)} | {drops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), default=1,
                        help="1: the search behind today's defaults; 2: the retention switches at a forgetting budget.")
    parser.add_argument("--output_dir", default=None, help="Runs folder (default: outputs/deal_search[_round2]).")
    parser.add_argument("--stages", default="1,2",
                        help="Stages to run (comma-separated numbers); later stages need the earlier ones.")
    parser.add_argument("--doc", default=None, help="Where to write the Markdown report (default: the round's).")
    parser.add_argument("--save", action="store_true",
                        help=f"Round 2: copy the finished points' metrics.json to {KEEP_ROUND2}/ and exit.")
    args, extra = parser.parse_known_args(argv)
    budget, stages, reference_grid, doc_path, output_dir = ROUNDS[args.round]
    args.doc = args.doc or doc_path
    keep = args.round == 2 and os.path.abspath(args.output_dir or output_dir) == os.path.abspath(output_dir)
    args.output_dir = args.output_dir or output_dir
    if args.save and not keep:
        parser.error(f"--save keeps round 2's points of its default output folder {output_dir} only.")
    if keep:
        if args.save:
            copied = copy_finished(args.output_dir, KEEP_ROUND2)
            print(f"saved {len(copied)} finished points to {KEEP_ROUND2}: {', '.join(copied) or 'none new'}")
            return 0
        restored = copy_finished(KEEP_ROUND2, args.output_dir)
        if restored:
            print(f"restored {len(restored)} finished points from {KEEP_ROUND2}")
    wanted = {int(s) for s in args.stages.split(",") if s.strip()}
    base = config_from_args(build_parser().parse_args([*budget, *extra, "--method", "deal"]))
    started = time.time()
    sections = []

    ref = sweep(dataclasses.replace(base, output_dir=os.path.join(args.output_dir, "reference")),
                parse_grid(reference_grid))
    fixed: dict = {}
    incumbent = None
    runs = [(f"method={p['settings']['method']}", p["output_dir"]) for p in ref["points"]]
    for i, (title, grid_specs) in enumerate(stages, start=1):
        if i not in wanted:
            break
        grid = parse_grid(grid_specs)
        cfg = dataclasses.replace(base, output_dir=os.path.join(args.output_dir, f"stage{i}"), **fixed)
        result = sweep(cfg, grid)
        sections.append(stage_table(f"Stage {i}: {title}", result, incumbent, cfg))
        for p in result["points"]:
            p["settings_all"] = {**fixed, **p["settings"]}
            runs.append((f"stage {i}: " + ", ".join(f"{k}={v}" for k, v in p["settings"].items()), p["output_dir"]))
        candidates = ([incumbent] if incumbent else []) + result["points"]  # a tie keeps the incumbent
        incumbent = best_point(candidates)
        fixed = dict(incumbent["settings_all"])
        print(f"after stage {i}: best {fixed} (validation AA {incumbent['average_accuracy']:.2f})")

    winner = {k: v for k, v in fixed.items()}
    ref_rows = "\n".join(f"| {p['settings']['method']} | {format_pct(p['average_accuracy'])} | "
                         f"{format_pct(p['backward_transfer'], True)} | {p['trainable_parameters']:,} | "
                         f"{p['wall_seconds'] / 60:.1f} min |" for p in ref["points"])
    title = ("DEAL's default settings: how they were found" if args.round == 1 else
             "DEAL round 2: the retention switches searched at a budget where SeqLoRA forgets")
    winner_title = ("Winner (the `tuned` profile: `TrainConfig`'s defaults)" if args.round == 1 else
                    "Winner of round 2 (on top of round 1's defaults; it becomes the default only once it beats the "
                    "baselines on the test split at the paper budget, docs/results.md)")
    doc = f"""# {title}

Generated by `python scripts/search_deal_defaults.py --round {args.round} --stages {args.stages}`; do not edit by hand.
Every number below is an average accuracy (AA, exact match %) on the **validation split** (`eval_split:
validation`: `validation_rows` rows per task carved from each training file and never trained on); the test
split was not used to choose anything.

Budget: `{' '.join(budget)}` plus `{' '.join(extra) or '(nothing)'}`: model `{base.model}`, tasks
{' → '.join(ref['tasks'])}, at most {base.max_train_samples} training rows per task, LoRA r {base.lora_rank} /
alpha {base.lora_alpha:g} on {', '.join(base.target_modules)}, lr {base.learning_rate:g}, batch
{base.per_device_train_batch_size}, seed {base.seed}. With {base.validation_rows} validation rows per task one row
is {100 / base.validation_rows:.1f} points of a task's accuracy and {100 / base.validation_rows / len(ref['tasks']):.1f}
points of AA: differences of a few points of AA are within noise. The whole search took
{(time.time() - started) / 60:.0f} minutes of this invocation (runs already finished are read back, not rerun) on 2 CPU cores.

Stages run one after another; each stage's best point (highest AA, ties to higher BWT) fixes its keys for the
next stage. Keys not listed keep the values they had before the search (TrainConfig defaults).

## Reference methods on the same split and budget

| method | validation AA | BWT | trainable params | wall |
|---|---:|---:|---:|---:|
{ref_rows}

## Stages

""" + "\n\n".join(sections) + """

## Mechanism: how far each task moves the adapter, and what that costs earlier tasks

Relative Frobenius change of the adapter over each task after the first (`deal/relative_change/*`, measured on
the folded factors), next to the change of every earlier task's validation accuracy over the same task
(negative = forgetting).

""" + mechanism_table(runs) + f"""

## {winner_title}

```json
{json.dumps(winner, indent=2, sort_keys=True)}
```

The paper's literal method stays available as `deal_profile: paper` (no residual update, no drift penalty,
regularisers on the raw parameters).
"""
    os.makedirs(os.path.dirname(args.doc) or ".", exist_ok=True)
    atomic_write_text(args.doc, doc)
    print(f"Written {args.doc}")
    if keep:
        copy_finished(args.output_dir, KEEP_ROUND2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
