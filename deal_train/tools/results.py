"""The project's results page: every method on the standard benchmark, and DEAL's data efficiency.

``python -m deal_train.results --runs outputs/results --output docs/results.md`` reads the runs'
``metrics.json`` files and writes ``docs/results.md`` and its PNG figures under ``docs/results/`` (the output's
name without ``.md``). It never trains and never crashes on missing or partial runs: they are reported as
"not run yet" or "partial (k of n tasks)", so it can be run at any time while ``scripts/reproduce_results.sh``
is still producing runs.

Layout of ``--runs`` (written by ``scripts/reproduce_results.sh``, one ``python -m deal_train.compare``
invocation per method):

* ``<runs>/standard_order<k>/<method>/metrics.json``: the table, benchmark ``standard``, task order k;
* ``<runs>/tc_rows<n>/<method>/metrics.json``: the data-efficiency curve, benchmark ``tc``, n training rows per task;
* ``<runs>/reproduce.log``: one tab-separated line per invocation (``LOG_FIELDS``); label ``session`` lines hold
  the script's settings and the duration of one whole call of the script.

Statistics over task orders are the mean, the sample standard deviation (n - 1 in the denominator) and the
range (min-max) of the per-order values; the paper reports task-order robustness the same way (Fig. 2b).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
from typing import Sequence

from . import stats
from .forgetting import breakdown_table
from .compare import format_duration, run_summary
from ..config import with_legacy_defaults
from ..methods import METHOD_NAMES, is_foreign_key, method_class, method_with_role, methods_with
from ..train.evaluation import spread
from ..outputs import (RunLayout, atomic_write_text, draw_accuracy_matrix, format_pct, plot_average_accuracy, plot_lines,
                       save_figure)

PROPOSED = method_with_role("proposed")
"""The method the page judges (DEAL), from the registry (``results_role``)."""
PLAIN = method_with_role("plain")
"""The plain LoRA baseline the data-efficiency curve sets it against (SeqLoRA)."""
TABLE_METHODS = [PROPOSED] + [m for m in METHOD_NAMES if m != PROPOSED]
TABLE_ORDERS = [1, 2, 3]
CURVE_METHODS = [PROPOSED, PLAIN]
CURVE_ROWS = [50, 100, 200, 400]
ORACLES = tuple(methods_with("oracle"))
"""Methods that are not continual learners (docs/design.md section 4: PerTaskFT evaluates task i with its own
adapter i): left out of the ranking of the non-oracle methods and shown as an upper reference."""

LOG_FILE = "reproduce.log"
LOG_FIELDS = ("start_utc", "seconds", "exit_code", "label", "command")
"""Columns of ``reproduce.log`` (tab-separated, no header)."""

PAPER_TABLE1 = {m: (method_class(m).label, method_class(m).paper_aa)
                for m in [*(m for m in METHOD_NAMES if m != PROPOSED), PROPOSED] if method_class(m).paper_aa}
"""The paper's Table 1 (AA %, docs/design.md section 5; each method declares its row as ``paper_aa``; the
proposed method last): T5-large and
LLaMA-3.1-8B, 1,000 training rows per task, a different backbone, budget and hardware."""

BUDGET_KEYS = ("model", "max_train_samples", "max_test_samples", "validation_rows", "eval_split", "eval_zero_shot",
               "lora_rank", "lora_alpha", "target_modules", "learning_rate", "deal_learning_rate", "deal_profile",
               "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_source_length",
               "max_new_tokens", "chat_template", "seed")
"""Settings shown in the budget line (read from the runs' own ``metrics.json``)."""

NOT_RUN = "not run yet"


def order_dir(order: int) -> str:
    """Directory name of the table's runs for one task order: ``standard_order<k>``."""
    return f"standard_order{order}"


def curve_dir(rows: int) -> str:
    """Directory name of one data-efficiency point: ``tc_rows<n>``."""
    return f"tc_rows{rows}"


@dataclasses.dataclass
class Run:
    """One (group, method) cell: ``status`` is ``finished``, ``partial``, ``missing`` or ``unreadable``;
    ``metrics`` the ``metrics.json`` content (None when missing or unreadable), ``summary`` ``compare.run_summary``
    of a finished run (None otherwise), ``note`` the reason a file could not be read."""

    group: str
    method: str
    path: str
    status: str
    metrics: dict | None = None
    summary: dict | None = None
    note: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run finished every task (its ``metrics.json`` says ``finished``)."""
        return self.status == "finished"

    def status_text(self) -> str:
        """``finished``, ``not run yet``, ``partial (k of n tasks)`` or ``unreadable (...)``."""
        if self.status == "missing":
            return NOT_RUN
        if self.status == "partial":
            m = self.metrics or {}
            return f"partial ({m.get('completed_tasks', 0)} of {len(m.get('tasks', []))} tasks)"
        if self.status == "unreadable":
            return f"unreadable ({self.note})"
        return "finished"


def load_run(root: str, group: str, method: str) -> Run:
    """Read ``<root>/<group>/<method>/metrics.json``; never raises on a missing, partial or corrupt file."""
    path = RunLayout(os.path.join(root, group, method)).metrics
    if not os.path.isfile(path):
        return Run(group, method, path, "missing")
    try:
        with open(path, encoding="utf-8") as fh:
            metrics = json.load(fh)
        if not metrics.get("finished"):
            return Run(group, method, path, "partial", metrics)
        return Run(group, method, path, "finished", metrics, run_summary(metrics))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Run(group, method, path, "unreadable", note=f"{type(err).__name__}: {str(err)[:80]}")


def format_spread(s: dict, digits: int = 1, signed: bool = False) -> str:
    """``54.2 ± 8.8 [41.7–66.7]`` (mean ± std [min–max]); one value alone; ``not run yet`` for none."""
    if not s["n"]:
        return NOT_RUN
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    if s["n"] == 1:
        return f(s["mean"])
    return f"{f(s['mean'])} ± {s['std']:.{digits}f} [{f(s['min'])}–{f(s['max'])}]"


def _rel(path: str, start: str) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def read_log(path: str) -> list[dict]:
    """The lines of ``reproduce.log`` as dicts with ``LOG_FIELDS`` keys (``seconds`` a float, ``exit_code`` a
    string); malformed lines are skipped. Empty when the file does not exist."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(LOG_FIELDS):
                continue
            row = dict(zip(LOG_FIELDS, parts))
            try:
                row["seconds"] = float(row["seconds"])
            except ValueError:
                continue
            out.append(row)
    return out


# --- the verdict ------------------------------------------------------------------------------------
def final_accuracies(run: Run) -> dict[str, float]:
    """Task -> exact match (%) after the last task, of a finished run."""
    m = run.metrics
    return {t: row[-1] for t, row in zip(m["tasks"], m["accuracy_matrix"])}


def learned_accuracy(run: Run) -> float:
    """Mean of the accuracy matrix's diagonal (each task just after training it, %): how well tasks are learned,
    before any forgetting."""
    acc = run.metrics["accuracy_matrix"]
    return statistics.fmean(acc[i][i] for i in range(len(acc)))


def paired_intervals(table: dict[str, dict[int, Run]], a: str, b: str, orders: Sequence[int]) -> dict:
    """Order -> ``stats.Interval`` of AA(a) - AA(b) (fractions; rows paired, ``stats.paired_difference_interval``)
    from both runs' per-row predictions, or None where either run has none or they score different rows."""
    out = {}
    for o in orders:
        try:
            fa = stats.run_row_scores(os.path.dirname(table[a][o].path), table[a][o].metrics["tasks"])[0]
            fb = stats.run_row_scores(os.path.dirname(table[b][o].path), table[b][o].metrics["tasks"])[0]
            out[o] = stats.paired_difference_interval(fa, fb)
        except (OSError, ValueError):
            out[o] = None
    return out


def verdict(table: dict[str, dict[int, Run]], methods: Sequence[str], orders: Sequence[int]) -> list[str]:
    """Markdown paragraphs that rank the non-oracle methods by mean AA over ``orders`` and say by how much DEAL
    leads or trails the best other one, in which orders, on which tasks, and whether from forgetting (BWT) or
    from learning less (the diagonal). Only methods that finished every order are ranked."""
    def complete(m: str) -> bool:
        return all(table[m][o].finished for o in orders)

    ranked = [m for m in methods if m not in ORACLES and complete(m)]
    left_out = [m for m in methods if m not in ORACLES and not complete(m)]
    order_text = ", ".join(map(str, orders))
    if PROPOSED not in ranked or len(ranked) < 2:
        need = [m for m in ([PROPOSED] if PROPOSED in methods else []) if m not in ranked]
        return [f"**No verdict yet.** It needs DEAL and at least one other non-oracle method finished on every "
                f"order ({order_text}); " + ("DEAL is not finished on all of them; " if need else "")
                + f"methods not finished on every order: {', '.join(left_out) or 'none'}."]
    mean_aa = {m: statistics.fmean(table[m][o].summary["average_accuracy"] for o in orders) for m in ranked}
    by_aa = sorted(ranked, key=lambda m: -mean_aa[m])
    best = by_aa[0]
    deal_aa = mean_aa[PROPOSED]
    lines = []
    ref0 = best if best != PROPOSED else next(m for m in by_aa if m != PROPOSED)
    ivs = paired_intervals(table, PROPOSED, ref0, orders)
    signs = {iv.estimate > 0 for iv in ivs.values() if iv is not None and iv.excludes_zero}
    settled = all(iv is not None and iv.excludes_zero for iv in ivs.values()) and len(signs) == 1
    if not settled:
        open_orders = [str(o) for o, iv in ivs.items() if iv is None or not iv.excludes_zero]
        why = (f"the paired 95% interval of the difference contains 0 (or there are no per-row predictions) in "
               f"order(s) {', '.join(open_orders)}" if open_orders else
               "the paired 95% intervals exclude 0 but point in different directions across orders")
        lead = (f"**No ranking claim between DEAL and `{ref0}`**: mean AA over orders {order_text} is "
                f"{deal_aa:.1f}% for DEAL and {mean_aa[ref0]:.1f}% for `{ref0}` ({deal_aa - mean_aa[ref0]:+.1f} "
                f"points), but {why}.")
        ref = ref0
    elif best == PROPOSED or math.isclose(mean_aa[best], deal_aa):
        ref = next(m for m in by_aa if m != PROPOSED)
        gap = deal_aa - mean_aa[ref]
        if math.isclose(gap, 0.0):
            lead = (f"**DEAL ties with `{ref}` for the best mean AA of the non-oracle methods**: {deal_aa:.1f}% over "
                    f"orders {order_text}.")
        else:
            lead = (f"**DEAL has the best mean AA of the non-oracle methods**: {deal_aa:.1f}% over orders "
                    f"{order_text}, leading the next best, `{ref}` ({mean_aa[ref]:.1f}%), by {gap:.1f} points.")
    else:
        ref = best
        gap = deal_aa - mean_aa[ref]
        lead = (f"**DEAL is not the best non-oracle method here.** The best mean AA over orders {order_text} is "
                f"`{best}`'s {mean_aa[best]:.1f}%; DEAL reaches {deal_aa:.1f}% and trails it by {-gap:.1f} points "
                f"(rank {by_aa.index(PROPOSED) + 1} of {len(by_aa)}).")
    lines.append(lead)
    ranking = ", ".join(f"`{m}` {mean_aa[m]:.1f}" for m in by_aa)
    lines.append(f"Mean AA (%) over orders (no significance implied; see the intervals): {ranking}."
                 + (f" Not ranked (not finished on every order): {', '.join(f'`{m}`' for m in left_out)}."
                    if left_out else ""))
    per_order = [table[PROPOSED][o].summary["average_accuracy"] - table[ref][o].summary["average_accuracy"]
                 for o in orders]
    ahead = sum(d > 0 for d in per_order)
    test_rows = table[PROPOSED][orders[0]].metrics["config"].get("max_test_samples") or 0
    n_tasks = len(table[PROPOSED][orders[0]].metrics["tasks"])
    noise = (f" With {test_rows} test rows per task one row {_one_row_moves(test_rows, n_tasks)}; the spread over orders "
             f"is in the table below." if test_rows else "")
    def _with_ci(o, d):
        iv = ivs.get(o) if ref == ref0 else None
        return (f"order {o} {d:+.1f}" + (f" (95% CI {100 * iv.low:+.1f} to {100 * iv.high:+.1f})" if iv else ""))

    lines.append(f"DEAL minus `{ref}` in AA, per order: "
                 + ", ".join(_with_ci(o, d) for o, d in zip(orders, per_order))
                 + f"; mean {statistics.fmean(per_order):+.1f}"
                 + f" (DEAL ahead in {ahead} of {len(orders)} orders)." + noise)
    # where it falls short: per task (final accuracy averaged over orders), forgetting vs learning
    tasks = table[PROPOSED][orders[0]].metrics["tasks"]
    diffs = {}
    for t in tasks:
        d = [final_accuracies(table[PROPOSED][o]).get(t) for o in orders]
        r = [final_accuracies(table[ref][o]).get(t) for o in orders]
        if None not in d and None not in r:
            diffs[t] = statistics.fmean(d) - statistics.fmean(r)
    worse = sorted((t for t in diffs if diffs[t] < 0), key=lambda t: diffs[t])
    better = sorted((t for t in diffs if diffs[t] > 0), key=lambda t: -diffs[t])
    bwt = {m: statistics.fmean(table[m][o].summary["backward_transfer"] or 0.0 for o in orders) for m in (PROPOSED, ref)}
    learned = {m: statistics.fmean(learned_accuracy(table[m][o]) for o in orders) for m in (PROPOSED, ref)}
    lines.append(
        f"Against `{ref}`, final accuracy per task (mean over orders): DEAL is lower on "
        + (", ".join(f"{t} ({diffs[t]:+.1f})" for t in worse) or "no task")
        + " and higher on " + (", ".join(f"{t} ({diffs[t]:+.1f})" for t in better) or "no task")
        + f". Forgetting: mean BWT {bwt[PROPOSED]:+.1f} (DEAL) vs {bwt[ref]:+.1f}; learning: mean accuracy of each task "
        f"just after training it {learned[PROPOSED]:.1f} (DEAL) vs {learned[ref]:.1f}.")
    oracles = [m for m in methods if m in ORACLES and complete(m)]
    for m in oracles:
        o_aa = statistics.fmean(table[m][o].summary["average_accuracy"] for o in orders)
        lines.append(f"The oracle-like `{m}` (a separate adapter per task, each task evaluated with its own adapter; "
                     f"not a continual learner) reaches {o_aa:.1f}%: DEAL is {deal_aa - o_aa:+.1f} points from it.")
    return lines


# --- figures ----------------------------------------------------------------------------------------
def plot_matrix_grid(path: str, runs: Sequence[Run], title: str) -> None:
    """One figure with the accuracy-matrix heat map (``outputs.draw_accuracy_matrix``) of every run of one
    order; a run without any evaluated task gets a panel saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    n = max((len(r.metrics["tasks"]) for r in runs if r.metrics), default=4)
    size = 0.9 * n + 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.0, size * rows + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for k, (ax, run) in enumerate(zip(axes.flat, runs)):
        if run.metrics and run.metrics.get("completed_tasks"):
            label = run.method if run.finished else f"{run.method} ({run.status_text()})"
            if run.finished:
                label += f": AA {run.summary['average_accuracy']:.1f}"
            image = draw_accuracy_matrix(ax, run.metrics["tasks"], run.metrics["accuracy_matrix"], label, fontsize=8)
            if k % cols:
                ax.set_ylabel("")
        else:
            ax.text(0.5, 0.5, f"{run.method}\n{run.status_text()}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    for ax in list(axes.flat)[len(runs):]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes, label="exact match (%)", shrink=0.8)
    save_figure(fig, path)


def plot_data_efficiency(path: str, curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Save the data-efficiency curve (PNG): AA (%) against training rows per task (log scale), one line per
    method; ``curves`` maps a method to its finished (rows, AA) points."""
    ticks = sorted({x for pts in curves.values() for x, _ in pts})

    def axes(ax) -> None:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()

    plot_lines(path, {name: sorted(pts) for name, pts in curves.items()}, xlabel="training rows per task",
               ylabel="average accuracy after the last task (%)", title=title, set_x_axis=axes)


# --- the page ---------------------------------------------------------------------------------------
def budget_text(runs: Sequence[Run], varied: Sequence[str] = ()) -> list[str]:
    """The settings shared by ``runs`` (from their saved configs; keys a run predates at the value it ran with,
    ``config.with_legacy_defaults``), and a warning naming the keys in which they differ (other than method, order,
    where they were written and the ``varied`` keys, shown as varied)."""
    cfgs = [with_legacy_defaults(r.metrics["config"]) for r in runs if r.metrics and "config" in r.metrics]
    if not cfgs:
        return ["No run has written its settings yet."]
    ignore = {"method", "order", "tasks", "output_dir", "overwrite_output_dir", "resume_from", *varied}
    keys = sorted({k for c in cfgs for k in c} - ignore)
    differ = [k for k in keys if not is_foreign_key(k, None)
              and len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
    shown = ", ".join(f"`{k}: {'(varied)' if k in varied else json.dumps(cfgs[0].get(k))}`"
                      for k in BUDGET_KEYS if k in cfgs[0])
    out = [f"Settings read from the runs' `metrics.json`: {shown}."]
    if differ:
        out.append(f"**Warning: the runs do not share one budget**; they differ in {', '.join(differ)}.")
    return out


def table_section(table: dict[str, dict[int, Run]], methods: Sequence[str], orders: Sequence[int],
                  figures: str, doc_dir: str) -> list[str]:
    """The standard-benchmark section: summary over orders, per-order values, per-order figures."""
    lines = ["| Method | Orders finished | AA (%) | BWT (%) | ROUGE-1 (%) | Wall time (min) | Peak RSS (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        done = [table[m][o].summary for o in orders if table[m][o].finished]
        cell = lambda key, scale=1.0, digits=1, signed=False: format_spread(  # noqa: E731
            spread([None if s[key] is None else s[key] * scale for s in done]), digits, signed)
        name = f"{m} (oracle)" if m in ORACLES else m
        lines.append(f"| {name} | {len(done)} of {len(orders)} | {cell('average_accuracy')} | "
                     f"{cell('backward_transfer', signed=True)} | {cell('average_rouge1')} | "
                     f"{cell('wall_seconds', 1 / 60)} | {cell('peak_rss_bytes', 1 / 2**30, 2)} |")
    lines += ["", "Each cell: mean ± sample standard deviation (n − 1) [min–max] over the finished orders (one value "
              "when only one order is finished). AA: mean exact match over all tasks after the last task. BWT: mean "
              "over the earlier tasks of the final exact match minus the one just after training that task. "
              "ROUGE-1: mean ROUGE-1 F1 after the last task. Wall time: training and evaluation, summed over the tasks "
              "(model loading not included). Peak RSS: the run's peak resident memory (each method runs in a process "
              "of its own).", "", "### Per order", "",
              "| Order | Tasks | Method | Status | AA (%) | BWT (%) | ROUGE-1 (%) | Wall time | Peak RSS (GiB) | "
              "AA after each task (%) |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for o in orders:
        tasks = next((r.metrics["tasks"] for r in table_runs(table, methods, [o]) if r.metrics), None)
        for m in methods:
            r = table[m][o]
            task_text = " → ".join(tasks) if tasks else "–"
            if r.finished:
                s = r.summary
                lines.append(f"| {o} | {task_text} | {m} | finished | {format_pct(s['average_accuracy'])} | "
                             f"{format_pct(s['backward_transfer'], True)} | {format_pct(s['average_rouge1'])} | "
                             f"{format_duration(s['wall_seconds'])} | {s['peak_rss_bytes'] / 2**30:.2f} | "
                             + " / ".join(f"{v:.1f}" for v in s["average_accuracy_after_task"]) + " |")
            else:
                after = [p["average_accuracy_so_far"] for p in (r.metrics or {}).get("per_task", [])]
                lines.append(f"| {o} | {task_text} | {m} | {r.status_text()} | – | – | – | – | – | "
                             + (" / ".join(f"{v:.1f}" for v in after) or "–") + " |")
    lines += ["", "### Average accuracy after each task", ""]
    for o in orders:
        runs = [table[m][o] for m in methods if table[m][o].metrics and table[m][o].metrics.get("per_task")]
        if not runs:
            lines.append(f"Order {o}: {NOT_RUN}.")
            continue
        tasks = runs[0].metrics["tasks"]
        path = os.path.join(figures, f"aa_after_task_order{o}.png")
        plot_average_accuracy(path, tasks, {(r.method if r.finished else f"{r.method} (partial)"):
                                            [p["average_accuracy_so_far"] for p in r.metrics["per_task"]]
                                            for r in runs},
                              f"standard order {o}: average accuracy of the tasks seen, after each task")
        lines.append(f"![Order {o}: average accuracy of the tasks seen after each task]({_rel(path, doc_dir)})")
    lines += ["", "### Accuracy matrices", "",
              "Row = evaluated task, column = after training task t (exact match %).", ""]
    for o in orders:
        runs = [table[m][o] for m in methods]
        if not any(r.metrics and r.metrics.get("completed_tasks") for r in runs):
            lines.append(f"Order {o}: {NOT_RUN}.")
            continue
        path = os.path.join(figures, f"accuracy_matrices_order{o}.png")
        plot_matrix_grid(path, runs, f"standard order {o}: accuracy matrices")
        lines.append(f"![Order {o}: accuracy matrices]({_rel(path, doc_dir)})")
    return lines


def table_runs(table: dict[str, dict[int, Run]], methods: Sequence[str], orders: Sequence[int]) -> list[Run]:
    """The table's runs, method by method, each in the order of ``orders``."""
    return [table[m][o] for m in methods for o in orders]


def _one_row_moves(test_rows: int, n_tasks: int) -> str:
    """The resolution of exact-match numbers: what one test row is worth, in points of a task's accuracy and of AA."""
    return f"moves a task's accuracy by {100 / test_rows:.1f} points and AA by {100 / test_rows / n_tasks:.1f}"


def curve_section(curve: dict[str, dict[int, Run]], methods: Sequence[str], rows: Sequence[int], figures: str,
                  doc_dir: str) -> list[str]:
    """The data-efficiency section: AA per training-set size and method, the plot, DEAL minus SeqLoRA."""
    lines = ["| Training rows per task | " + " | ".join(f"{m} AA (%)" for m in methods)
             + (" | DEAL − SeqLoRA |" if {PROPOSED, PLAIN} <= set(methods) else " |"),
             "|---:|" + "---:|" * len(methods) + ("---:|" if {PROPOSED, PLAIN} <= set(methods) else "")]
    for n in rows:
        cells = [(format_pct(curve[m][n].summary["average_accuracy"]) if curve[m][n].finished
                  else curve[m][n].status_text()) for m in methods]
        line = f"| {n} | " + " | ".join(cells) + " |"
        if {PROPOSED, PLAIN} <= set(methods):
            d, s = curve[PROPOSED][n], curve[PLAIN][n]
            line += (f" {d.summary['average_accuracy'] - s.summary['average_accuracy']:+.1f} |"
                     if d.finished and s.finished else " – |")
        lines.append(line)
    points = {m: [(n, curve[m][n].summary["average_accuracy"]) for n in rows if curve[m][n].finished] for m in methods}
    finished = [curve[m][n] for m in methods for n in rows if curve[m][n].finished]
    if finished:
        tasks = finished[0].metrics["tasks"]
        test_rows = finished[0].metrics["config"].get("max_test_samples")
        path = os.path.join(figures, "data_efficiency.png")
        plot_data_efficiency(path, {m: p for m, p in points.items() if p},
                             f"tc ({' → '.join(tasks)}): AA vs training rows per task")
        noise = (f" One test row {_one_row_moves(test_rows, len(tasks))}, and each point is one run (one seed), so "
                 f"differences of a few points are within noise." if test_rows else "")
        lines += ["", f"Tasks {' → '.join(tasks)}; at most {test_rows} test rows per task at every size (the same "
                  f"rows); everything else as in the table above.{noise}", "",
                  f"![Data efficiency: AA against training rows per task]({_rel(path, doc_dir)})"]
    else:
        lines += ["", f"No point of the curve has finished yet ({NOT_RUN})."]
    return lines


def paper_section(table: dict[str, dict[int, Run]], curve: dict[str, dict[int, Run]], orders: Sequence[int],
                  rows: Sequence[int]) -> list[str]:
    """The paper's Table 1, labelled as the paper's, beside our own standard and tc numbers."""
    cols = ["T5 TC", "T5 standard", "T5 long", "LLaMA TC", "LLaMA standard", "LLaMA long"]
    largest = max(rows) if rows else None
    lines = ["**The paper's numbers, not ours** (Han, Zhao et al., NeurIPS 2025, Table 1; AA %): T5-large and "
             "LLaMA-3.1-8B, 1,000 training rows and up to 500 test rows per task, FP16 on an A100. Our runs use "
             "SmolLM2-135M-Instruct on 2 CPU cores with a far smaller budget, so only the ranking of the methods, "
             "not the level, can be set side by side.", "",
             "| Method | " + " | ".join(f"paper: {c}" for c in cols) + " | ours: standard, mean over orders | "
             f"ours: tc, {largest} rows |", "|---|" + "---:|" * (len(cols) + 2)]
    for key, (name, vals) in PAPER_TABLE1.items():
        ours = spread([table[key][o].summary["average_accuracy"] for o in orders
                       if key in table and table[key][o].finished])
        ours_text = NOT_RUN if not ours["n"] else f"{ours['mean']:.1f}"
        if 0 < ours["n"] < len(orders):
            ours_text += f" ({ours['n']} of {len(orders)} orders)"
        tc = curve.get(key, {}).get(largest) if largest is not None else None
        tc_text = "–" if tc is None else (format_pct(tc.summary["average_accuracy"]) if tc.finished else NOT_RUN)
        lines.append(f"| {name} | " + " | ".join(f"{vals[c]:.1f}" for c in cols) + f" | {ours_text} | {tc_text} |")
    return lines


def time_section(all_runs: Sequence[Run], log: list[dict], log_path: str, doc_dir: str) -> list[str]:
    """The time taken: the runs' own wall times and the script's per-invocation log."""
    finished = [r for r in all_runs if r.finished]
    total_run = sum(r.summary["wall_seconds"] for r in finished)
    missing = [r for r in all_runs if not r.finished]
    lines = [f"Finished runs: {len(finished)} of {len(all_runs)}; their own training and evaluation time adds up to "
             f"{format_duration(total_run)}."]
    invocations = [row for row in log if row["label"] != "session"]
    sessions = [row for row in log if row["label"] == "session"]
    if not log:
        lines.append(f"No script log at `{_rel(log_path, doc_dir)}` (the runs were not made by "
                     "`scripts/reproduce_results.sh`, or its log was removed).")
        return lines
    lines.append(f"The script's log (`{os.path.basename(log_path)}`): {len(sessions)} call(s) of the script taking "
                 f"{format_duration(sum(r['seconds'] for r in sessions))} in all; {len(invocations)} compare "
                 f"invocation(s) taking {format_duration(sum(r['seconds'] for r in invocations))} (model loading and "
                 f"reading back finished runs included; parallel invocations overlap).")
    per_label: dict[str, list[dict]] = {}
    for row in invocations:
        per_label.setdefault(row["label"], []).append(row)
    if missing and finished:
        mean_run = total_run / len(finished)
        lines.append(f"Rough estimate of what is left: {len(missing)} run(s) × {format_duration(mean_run)} (the mean "
                     f"of the finished runs) ≈ {format_duration(len(missing) * mean_run)} with one job at a time.")
    if sessions:
        lines += ["", "Settings of the script's last call: `" + sessions[-1]["command"] + "`."]
    own = {f"{r.group}/{r.method}": r for r in all_runs}
    lines += ["", "<details><summary>Every compare command: its invocations (a later call of the script reads a "
              "finished run back in seconds, or resumes a partial one), their wall time added up, and the run's own "
              "training and evaluation time from its metrics.json</summary>", "",
              "| Run | First started (UTC) | Invocations | Their wall time | Last exit code | Run's own time | Command |",
              "|---|---|---:|---:|---:|---:|---|"]
    for label, rows in sorted(per_label.items()):
        run = own.get(label)
        own_time = format_duration(run.summary["wall_seconds"]) if run is not None and run.finished else "–"
        lines.append(f"| {label} | {min(r['start_utc'] for r in rows)} | {len(rows)} | "
                     f"{format_duration(sum(r['seconds'] for r in rows))} | {rows[-1]['exit_code']} | {own_time} | "
                     f"`{rows[-1]['command']}` |")
    lines += ["", "</details>"]
    return lines


# --- uncertainty: power calculation, bootstrap intervals, paired differences ----------------------------------
PAPER_TEST_ROWS = [500, 500, 439, 500]  # standard benchmark: dbpedia, amazon, yahoo, agnews (all test rows)
ASSUMED_DISAGREEMENT = 0.2


def uncertainty_section(table: dict[str, dict[int, Run]], methods: Sequence[str], orders: Sequence[int]) -> list[str]:
    """Markdown: the power calculation (from the finished runs' test-row counts, else the paper budget's), then per
    method and order AA and BWT with 95% bootstrap intervals and the paired AA difference against DEAL and against
    SeqLoRA, each with a verdict sentence that ranks only where the interval excludes 0. Runs without per-row
    predictions are listed as such; nothing raises for them."""
    scores: dict[tuple[str, int], tuple] = {}
    missing = []
    for m in methods:
        for o in orders:
            r = table[m][o]
            if not r.finished:
                continue
            try:
                scores[(m, o)] = stats.run_row_scores(os.path.dirname(r.path), r.metrics["tasks"])
            except (OSError, ValueError) as err:
                missing.append(f"`{m}` order {o} ({str(err)[:100]})")
    rows = [len(x) for x in next(iter(scores.values()))[0]] if scores else PAPER_TEST_ROWS
    source = "the finished runs" if scores else "the paper budget (no finished run with predictions yet)"
    se = stats.aa_standard_error(rows)
    se_d = stats.paired_difference_standard_error(rows, ASSUMED_DISAGREEMENT)
    lines = [f"Power: {len(rows)} tasks with {', '.join(map(str, rows))} test rows (from {source}). The binomial "
             f"standard error of one AA at p = 0.5 is {100 * se:.2f} points; of a paired AA difference, assuming the "
             f"two methods disagree on {ASSUMED_DISAGREEMENT:.0%} of rows, {100 * se_d:.2f} points, so one order "
             f"resolves differences of about {100 * 1.96 * se_d:.1f} points (95%).", "",
             f"Intervals: 95% percentile bootstrap (`scipy.stats.bootstrap`, {stats.N_RESAMPLES:,} resamples) over "
             f"each task's test rows; paired differences resample the same rows for both methods.", ""]
    plain = method_with_role("plain")
    if scores:
        lines += ["| method | order | AA (95% CI) | BWT (95% CI) | AA − DEAL (95% CI) | AA − SeqLoRA (95% CI) |",
                  "|---|---|---|---|---|---|"]
        verdicts = []
        for (m, o), (final, diag) in scores.items():
            aa, bwt = stats.aa_interval(final), stats.bwt_interval(final, diag)
            cells = []
            for ref in (PROPOSED, plain):
                if ref == m or (ref, o) not in scores:
                    cells.append("—")
                    continue
                cells.append(_ci(stats.paired_difference_interval(final, scores[(ref, o)][0]), signed=True))
            if m != PROPOSED and (PROPOSED, o) in scores:
                iv = stats.paired_difference_interval(scores[(PROPOSED, o)][0], final)
                verdicts.append(f"Order {o}: " + stats.significance_sentence(PROPOSED, m, iv))
            lines.append(f"| `{m}` | {o} | {_ci(aa)} | {_ci(bwt, signed=True)} | {cells[0]} | {cells[1]} |")
        lines += ["", *verdicts]
    if missing:
        lines += ["", "No per-row predictions for: " + "; ".join(missing) + "."]
    return lines


def forgetting_section(table: dict[str, dict[int, Run]], methods: Sequence[str], orders: Sequence[int]) -> list[str]:
    """Markdown: ``forgetting.breakdown_table`` of every finished run of the first order (what each method answers
    on its earlier tasks after the last task), or a line saying no run has finished."""
    o = orders[0]
    runs = [(m, os.path.dirname(table[m][o].path), table[m][o].metrics["tasks"]) for m in methods
            if table[m][o].finished and len(table[m][o].metrics.get("tasks", [])) > 1]
    if not runs:
        return [f"No finished order-{o} run yet."]
    return [f"Order {o}, after the last task: each earlier task's wrong answers split into a later task's label "
            "(the new task's output vocabulary leaking into old prompts), another of the task's own labels, or "
            "other text; and the most frequent answer's share of the task's rows (collapse onto one answer). "
            "Generated by `deal_train/tools/forgetting.py` from the runs' per-row predictions.", "",
            *breakdown_table(runs)]


def _ci(iv: stats.Interval, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * iv.estimate)} ({f.format(100 * iv.low)} to {f.format(100 * iv.high)})"


def build(runs_root: str, output: str, figures: str | None = None, methods: Sequence[str] = TABLE_METHODS,
          orders: Sequence[int] = TABLE_ORDERS, curve_methods: Sequence[str] = CURVE_METHODS,
          curve_rows: Sequence[int] = CURVE_ROWS, log_path: str | None = None) -> str:
    """Read the runs under ``runs_root`` and write the results page ``output`` (Markdown) and its figures
    (PNG) under ``figures`` (default: ``output`` without ``.md``). Returns the Markdown text.

    Missing, partial and unreadable runs are reported in the tables; nothing raises for them.
    """
    figures = figures or os.path.splitext(output)[0]
    doc_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(figures, exist_ok=True)
    log_path = log_path or os.path.join(runs_root, LOG_FILE)
    table = {m: {o: load_run(runs_root, order_dir(o), m) for o in orders} for m in methods}
    curve = {m: {n: load_run(runs_root, curve_dir(n), m) for n in curve_rows} for m in curve_methods}
    t_runs = table_runs(table, methods, orders)
    c_runs = [curve[m][n] for m in curve_methods for n in curve_rows]
    log = read_log(log_path)
    n_done = sum(r.finished for r in t_runs)
    c_done = sum(r.finished for r in c_runs)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Results: DEAL and the baselines on this machine", "",
        f"Generated by `scripts/paper_table.sh` (the runs) and `python -m deal_train.results --runs results` "
        f"(this page; here `--runs {runs_root} --output {output}`) from the runs' own `metrics.json` on {now}; do not edit by hand. "
        f"Finished: {n_done} of {len(t_runs)} table runs and {c_done} of {len(c_runs)} data-efficiency runs"
        + ("." if n_done == len(t_runs) and c_done == len(c_runs) else
           " — the page is incomplete; rerun the script to continue (finished runs are read back, not rerun)."),
        "", "## Verdict", "", *verdict(table, methods, orders),
        "", "## Uncertainty", "", *uncertainty_section(table, methods, orders),
        "", "## Where the forgetting goes", "", *forgetting_section(table, methods, orders),
        "", "## Budget", "",
        f"One budget for every method and order: benchmark `standard`, orders {', '.join(map(str, orders))}, each "
        f"method run in a process of its own (`scripts/paper_table.sh`: `python -m deal_train --config "
        f"configs/paper_budget_smollm2_order<k>.yaml --method <method>`; `scripts/reproduce_results.sh`: "
        f"`python -m deal_train.compare --methods <method>`).",
        "", *budget_text(t_runs),
        "", f"## Standard benchmark: every method, orders {', '.join(map(str, orders))}", "",
        *table_section(table, methods, orders, figures, doc_dir),
        "", "## Data efficiency: AA against training rows per task (benchmark tc)", "",
        *curve_section(curve, curve_methods, curve_rows, figures, doc_dir),
        "", *budget_text(c_runs, varied=["max_train_samples"]),
        "", "## The paper's Table 1, for reference", "", *paper_section(table, curve, orders, curve_rows),
        "", "## How to reproduce, and the time it took", "",
        "```", "scripts/paper_table.sh                  # the paper budget, into results/ (resumable; 'save' before a stop)",
        "scripts/reproduce_results.sh            # the small budget, into outputs/results (RESULTS_JOBS=2: two at once)",
        "```", "",
        *time_section(t_runs + c_runs, log, log_path, doc_dir),
    ]
    text = portable_paths("\n".join(lines) + "\n", runs_root)
    atomic_write_text(output, text)
    return text


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas") from None


def _name_list(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split()]


def portable_paths(text: str, runs_root: str) -> str:
    """``text`` with an absolute ``runs_root`` (as given, and resolved) written as ``$RESULTS_ROOT``, the script's
    variable: the page is committed and read on other machines, where this machine's folder means nothing."""
    for root in sorted({runs_root, os.path.abspath(runs_root)}, key=len, reverse=True):
        if os.path.isabs(root):
            text = text.replace(root.rstrip("/"), "$RESULTS_ROOT")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train.results``; exit code 2 when ``--runs`` is not a directory."""
    parser = argparse.ArgumentParser(prog="python -m deal_train.results", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="Root of the runs (scripts/reproduce_results.sh's RESULTS_ROOT).")
    parser.add_argument("--output", default=os.path.join("docs", "results.md"), help="Markdown file to write.")
    parser.add_argument("--figures", default=None, help="Folder of the PNG figures (default: --output without .md).")
    parser.add_argument("--methods", type=_name_list, default=TABLE_METHODS, help="Methods of the table (A,B,...).")
    parser.add_argument("--orders", type=_int_list, default=TABLE_ORDERS, help="Task orders of the table (1,2,3).")
    parser.add_argument("--curve_methods", type=_name_list, default=CURVE_METHODS, help="Methods of the curve.")
    parser.add_argument("--curve_rows", type=_int_list, default=CURVE_ROWS,
                        help="Training rows per task of the curve's points (50,100,200,400).")
    parser.add_argument("--log", default=None, help=f"The script's log (default: <runs>/{LOG_FILE}).")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs):
        print(f"error: --runs {args.runs}: no such directory (run scripts/reproduce_results.sh first, or give the "
              f"RESULTS_ROOT it wrote to).", file=sys.stderr)
        return 2
    build(args.runs, args.output, args.figures, args.methods, args.orders, args.curve_methods, args.curve_rows,
          args.log)
    print(f"Written {args.output} and its figures under {args.figures or os.path.splitext(args.output)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
