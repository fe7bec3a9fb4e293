"""Run several continual-learning methods on the same tasks, data, seed and budget, and compare them.

``python -m deal_train.compare --config base.yaml --methods deal,seq_lora,o_lora,per_task,replay,ewc,lwf
[--key value ...] --output_dir DIR`` takes every option of ``python -m deal_train`` except ``--method``
(the config's ``method`` is replaced by each entry of ``--methods``). Each method runs in this process, one
after another, with ``deal_train.loop.run`` into ``DIR/<method>/``: a finished run with the same settings is
read back instead of rerun, a partial one resumes after its last finished task (``--overwrite_output_dir true``
reruns every method from scratch). Then ``DIR/comparison.md`` (paste-ready tables and the plot),
``DIR/comparison.json`` and ``DIR/comparison.png`` (average accuracy over the tasks seen, after each task) are
written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

from ..cli import build_parser, quiet_libraries, run_cli
from ..config import ConfigError, TrainConfig, validate
from ..methods import METHOD_NAMES, method_class
from ..outputs import RunLayout, atomic_write_json, format_pct, atomic_write_text, plot_average_accuracy

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
COMPARISON_PNG = "comparison.png"


def parse_methods(text: str) -> list[str]:
    """``deal,deal:paper,seq_lora`` -> ``["deal", "deal:paper", "seq_lora"]``.

    An entry is a method name, or ``<name>:<profile>`` for a method with presets (its class's ``profiles``:
    ``deal:paper``).

    Raises:
        ConfigError: empty, an unknown method name or profile, or an entry given twice.
    """
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m.partition(":")[0] not in METHOD_NAMES
               or (":" in m and m.partition(":")[2] not in method_class(m.partition(":")[0]).profiles)]
    presets = " or ".join(f"{m}:<profile> with a profile of {', '.join(method_class(m).profiles)}"
                          for m in METHOD_NAMES if method_class(m).profiles)
    if not names or unknown:
        raise ConfigError(f"--methods {text!r}: give a comma-separated list of {', '.join(METHOD_NAMES)} (or "
                          f"{presets})"
                          + (f" (unknown: {', '.join(unknown)})." if unknown else "."))
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods {text!r} names a method twice.")
    return names


def method_config(base: TrainConfig, method: str) -> TrainConfig:
    """``base`` with ``method`` set and ``output_dir`` = ``<base.output_dir>/<method>``; for ``<name>:<profile>``
    (``deal:paper``), method ``<name>`` with that profile's preset values (``profile_config``) and ``output_dir``
    ``<base.output_dir>/<name>-<profile>``."""
    name, _, profile = method.partition(":")
    preset = method_class(name).profile_config(profile) if profile else {}
    cfg = dataclasses.replace(base, method=name, output_dir=os.path.join(base.output_dir, method.replace(":", "-")),
                              **preset)
    validate(cfg)
    return cfg


def finished_metrics(cfg: TrainConfig) -> dict | None:
    """The metrics of a finished run in ``cfg.output_dir`` made with the same settings, or None to (re)run.

    Raises:
        ConfigError: the directory holds a finished run with different settings (names the keys).
    """
    path = RunLayout(cfg.output_dir).metrics
    if cfg.overwrite_output_dir or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)
    if not old.get("finished"):
        return None
    from ..train.loop import comparable_config

    old_cfg = comparable_config(old.get("config", {}))
    new_cfg = comparable_config(cfg.to_dict())
    if old_cfg != new_cfg:
        diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        raise ConfigError(f"{cfg.output_dir} holds a finished run with other settings (keys: {', '.join(diff)}). "
                          f"Use another --output_dir, or --overwrite_output_dir true to rerun every method.")
    return old


def run_summary(metrics: dict) -> dict:
    """The figures of one finished run, from its ``metrics.json`` content (shared by compare and sweep rows).

    Keys: ``average_accuracy`` / ``backward_transfer`` / ``average_rouge1`` (in %; BWT None for one task),
    ``trainable_parameters`` (the most any task trained), ``wall_seconds`` (training + evaluation, summed over
    tasks), ``peak_rss_bytes`` (max over tasks), ``later_train_seconds_per_sample`` (training seconds / training
    samples summed over the tasks after the first, i.e. the tasks DEAL's filter and MLP train in -- the
    efficiency column of paper Table 7, in seconds; None for one task or no samples),
    ``later_trainable_parameters`` (the most any task after the first trained; None for one task),
    ``average_accuracy_after_task`` (one value per task, in %).
    """
    per_task = metrics["per_task"]
    later = per_task[1:]
    later_samples = sum(p["train_samples"] for p in later)
    return {
        "average_accuracy": metrics["average_accuracy"],
        "backward_transfer": metrics["backward_transfer"],
        "average_rouge1": metrics["average_rouge1"],
        "trainable_parameters": max(p["trainable_parameters"] for p in per_task),
        "wall_seconds": metrics["wall_seconds"],
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in per_task),
        "later_train_seconds_per_sample": (sum(p["train_seconds"] for p in later) / later_samples
                                           if later_samples else None),
        "later_trainable_parameters": max((p["trainable_parameters"] for p in later), default=None),
        "average_accuracy_after_task": [p["average_accuracy_so_far"] for p in per_task],
    }


def run_intervals(output_dir: str, tasks: list[str]) -> dict:
    """95% bootstrap intervals of a finished run's AA and BWT from its per-row predictions (``tools/stats.py``:
    test rows resampled per task, 10,000 resamples, percentile method, seed 0).

    Returns:
        ``average_accuracy_ci`` and ``backward_transfer_ci``: ``[low, high]`` in % (BWT None for one task), both
        None when a predictions file is missing (a run written before predictions were kept).
    """
    from . import stats

    try:
        final, diag = stats.run_row_scores(output_dir, tasks)
    except FileNotFoundError:
        return {"average_accuracy_ci": None, "backward_transfer_ci": None}
    aa = stats.aa_interval(final)
    bwt = stats.bwt_interval(final, diag) if len(tasks) > 1 else None
    return {"average_accuracy_ci": [100 * aa.low, 100 * aa.high],
            "backward_transfer_ci": [100 * bwt.low, 100 * bwt.high] if bwt else None}


def summary_row(method: str, metrics: dict, output_dir: str) -> dict:
    """One method's comparison row: ``method``, the keys of ``run_summary``, the intervals of ``run_intervals``
    and ``output_dir``."""
    return {"method": method, **run_summary(metrics), **run_intervals(output_dir, metrics["tasks"]),
            "output_dir": output_dir}


def format_interval(ci: list[float] | None, signed: bool = False) -> str:
    """``[low, high]`` in % as `` [48.1, 56.5]`` (signed for BWT); empty when there is no interval."""
    if ci is None:
        return ""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def run_or_read(cfgs: Sequence[TrainConfig], labels: Sequence[str]) -> tuple[list[dict], bool]:
    """Run each config with ``loop.run`` in this process, one after another, or read back its finished run.

    A finished run with the same settings in ``cfg.output_dir`` is read back (``finished_metrics``); a partial one
    resumes inside ``loop.run``. ``labels`` name the runs in messages.

    Returns:
        (the ``metrics.json`` content of every run, in order; whether the peak RSS could be reset before each
        run that was executed).
    Raises:
        ConfigError: a finished run with other settings in one of the directories.
    """
    from ..train.loop import run
    from ..train.profiling import reset_peak_rss

    out, peak_reset = [], True
    for cfg, label in zip(cfgs, labels):
        metrics = finished_metrics(cfg)
        if metrics is None:
            peak_reset = reset_peak_rss() and peak_reset
            metrics = run(cfg)
        else:
            print(f"{label}: finished run found in {cfg.output_dir}, not rerun.")
        out.append(metrics)
    return out, peak_reset


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def comparison_markdown(base: TrainConfig, tasks: list[str], rows: list[dict], peak_reset: bool) -> str:
    """The paste-ready Markdown report: settings, the summary table, the plot and the per-task AA table."""
    sequence = " → ".join(tasks)
    lines = [
        "## Continual-learning methods compared",
        "",
        f"Model `{base.model}`; tasks {sequence}; seed {base.seed}; at most {base.max_train_samples or 'all'} "
        f"training rows per task; scored on "
        + (f"{base.validation_rows} validation rows per task; " if base.eval_split == "validation"
           else f"at most {base.max_test_samples or 'all'} test rows per task; ")
        + f"LoRA rank {base.lora_rank} "
        f"(alpha {base.lora_alpha:g}) on {', '.join(base.target_modules)}; AdamW lr {base.learning_rate:g}, "
        f"batch {base.per_device_train_batch_size} × {base.gradient_accumulation_steps} accumulation, "
        f"{base.num_train_epochs} epoch(s) per task.",
        "",
        "| Method | AA (%) [95% CI] | BWT (%) [95% CI] | ROUGE-1 (%) | Trainable params | Wall time | Peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {format_pct(r['average_accuracy'])}"
                     f"{format_interval(r.get('average_accuracy_ci'))} | "
                     f"{format_pct(r['backward_transfer'], True)}{format_interval(r.get('backward_transfer_ci'), True)}"
                     f" | {format_pct(r['average_rouge1'])} | "
                     f"{r['trainable_parameters']:,} | {format_duration(r['wall_seconds'])} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    lines += [
        "",
        "AA: mean exact match over all tasks after the last task. BWT: mean over the earlier tasks of the final "
        "exact match minus the one just after training that task. [95% CI]: bootstrap interval over the test rows "
        "(resampled per task, 10,000 resamples; BWT resamples the per-row difference; no interval where a run kept no "
        "predictions). ROUGE-1: mean ROUGE-1 F1 after the last task. "
        "Trainable params: the most any task trained. Wall time: training and evaluation, summed over tasks. "
        "Peak RSS: peak resident memory of the process during the run"
        + ("." if peak_reset else " (could not be reset between methods run in one process: a later method's "
                                   "value includes the earlier ones')."),
        "",
        f"![Average accuracy of the tasks seen so far, after each task]({COMPARISON_PNG})",
        "",
        "Average accuracy (%) of the tasks seen so far, after each task:",
        "",
        "| Method | " + " | ".join(f"after {j + 1} ({t})" for j, t in enumerate(tasks)) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{v:.1f}" for v in r["average_accuracy_after_task"]) + " |")
    return "\n".join(lines) + "\n"


def compare(base: TrainConfig, methods: Sequence[str]) -> dict:
    """Run (or read back) every method under ``base.output_dir`` and write the comparison files.

    Returns:
        The ``comparison.json`` content: ``tasks``, ``config`` (the shared settings), ``methods`` (one
        ``summary_row`` per method, in the order given).
    Raises:
        ConfigError: invalid settings, or a finished run with other settings in a method's directory.
    """
    cfgs = [method_config(base, m) for m in methods]
    all_metrics, peak_reset = run_or_read(cfgs, list(methods))
    rows = [summary_row(label, metrics, cfg.output_dir) for label, cfg, metrics in zip(methods, cfgs, all_metrics)]
    tasks = all_metrics[0]["tasks"]
    shared = {k: v for k, v in base.to_dict().items() if k not in ("method", "output_dir", "overwrite_output_dir")}
    result = {"tasks": tasks, "config": shared, "methods": rows}
    plot_average_accuracy(os.path.join(base.output_dir, COMPARISON_PNG), tasks,
                          {r["method"]: r["average_accuracy_after_task"] for r in rows},
                          f"{base.model}: average accuracy of the tasks seen")
    write_report(base.output_dir, result, COMPARISON_JSON, comparison_markdown(base, tasks, rows, peak_reset),
                 COMPARISON_MD, also=(COMPARISON_PNG,))
    return result


def write_report(root: str, result: dict, json_name: str, markdown: str, md_name: str,
                 also: Sequence[str] = ()) -> None:
    """Write a tool's ``result`` (JSON) and ``markdown`` into folder ``root`` atomically, print the Markdown and
    the files written (``also``: files the caller wrote itself)."""
    atomic_write_json(os.path.join(root, json_name), result)
    atomic_write_text(os.path.join(root, md_name), markdown)
    print("\n" + markdown + f"\nWritten to {root}/{md_name}, " + ", ".join([json_name, *also]))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train.compare``; exit code 2 on bad input (as ``python -m deal_train``)."""
    parser = build_parser(prog="python -m deal_train.compare",
                          description="Run several continual-learning methods on the same tasks and budget and "
                                      "write comparison.md / comparison.json / comparison.png under --output_dir.")
    parser.add_argument("--methods", required=True, metavar="A,B,...",
                        help=f"Comma-separated methods to run, in this order: {', '.join(METHOD_NAMES)}.")
    args = parser.parse_args(argv)

    def main_cfg(cfg: TrainConfig) -> None:
        if args.method is not None:
            raise ConfigError("python -m deal_train.compare takes --methods (a list), not --method.")
        quiet_libraries()  # before the trainer's libraries are imported (by ``run_all``)
        compare(cfg, parse_methods(args.methods))

    return run_cli(main_cfg, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
