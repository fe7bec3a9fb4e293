"""Ablation sweeps: run one continual run per point of a grid of config values and tabulate them.

``python -m deal_train.sweep --config base.yaml --grid deal_kernel=heat,xexp,spline,haar [--grid key=v1,v2 ...]
--output_dir DIR [--key value ...]`` takes every option of ``python -m deal_train``. The points are the Cartesian
product of the grids (the first ``--grid`` varies slowest); a grid value overrides the same key from the YAML file or
the command line. Each point runs in this process with ``deal_train.loop.run`` into
``DIR/<key>=<value>[,<key>=<value>...]`` (characters other than ``A-Za-z0-9_.=,-`` become ``_``); as in
``deal_train.compare``, a finished run with the same settings is read back instead of rerun and a partial one
resumes. Then ``DIR/sweep.md`` and ``DIR/sweep.json`` are written: one row per point with AA, BWT, trainable
parameters (overall and of the tasks after the first), wall time and the training time per sample of the tasks
after the first (DEAL's tasks; the efficiency column of paper Table 7).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
from typing import Any, Sequence

from ..cli import build_parser, quiet_libraries, run_cli
from .compare import format_duration, run_or_read, run_summary, write_report
from ..config import PROFILES, ConfigError, TrainConfig, coerce_value, config_fields, validate
from ..methods import check_method_name
from ..outputs import format_pct

SWEEP_MD = "sweep.md"
SWEEP_JSON = "sweep.json"
NOT_SWEEPABLE = ("output_dir", "overwrite_output_dir")
"""Keys a grid may not vary: they say where and whether to write, not what to train."""

Grid = list[tuple[str, list[Any]]]
"""``[(key, [value, ...]), ...]``: values already coerced to the key's type, in the order given."""


def format_value(value: Any) -> str:
    """A grid value as it appears in a point's name: ``true``/``false`` for booleans, ``null`` for None (a float-or-null
    key such as ``deal_lambda_drift_history``), else ``str(value)``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def parse_grid(specs: Sequence[str]) -> Grid:
    """``["deal_kernel=heat,xexp", "lora_rank=4,8"]`` -> ``[("deal_kernel", ["heat", "xexp"]), ("lora_rank", [4, 8])]``.

    Values are coerced with the config's types (``config.coerce_value``).

    Raises:
        ConfigError: no ``--grid``, a spec without ``key=``, an unknown or unsweepable key (output_dir,
            overwrite_output_dir, list-valued keys such as tasks), an empty value list, a value of the wrong type,
            a value given twice for one key, or a key given in two ``--grid`` options.
    """
    fields = {name: typ for name, typ, _default, _meta in config_fields()}
    if not specs:
        raise ConfigError("Give at least one --grid key=v1,v2,...")
    grid: Grid = []
    for spec in specs:
        key, sep, rest = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r}: write key=value1,value2,...")
        if key not in fields:
            raise ConfigError(f"--grid {spec!r}: unknown config key {key!r}. Run with --help to list the keys.")
        if key in NOT_SWEEPABLE or fields[key] == list[str]:
            raise ConfigError(f"--grid {spec!r}: key {key!r} cannot be swept"
                              + (" (its values are comma-separated lists)." if fields[key] == list[str] else "."))
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid names {key!r} twice; put all its values in one --grid {key}=v1,v2,...")
        tokens = [t.strip() for t in rest.split(",")]
        if not rest.strip() or any(not t for t in tokens):
            raise ConfigError(f"--grid {spec!r}: give a comma-separated list of values with no empty entry.")
        values = [coerce_value(key, fields[key], t, f"--grid {spec!r}") for t in tokens]
        if len({format_value(v) for v in values}) != len(values):
            raise ConfigError(f"--grid {spec!r} gives the same value twice.")
        grid.append((key, values))
    return grid


def point_name(settings: dict[str, Any]) -> str:
    """``{"deal_kernel": "heat", "lora_rank": 4}`` -> ``deal_kernel=heat,lora_rank=4`` (only [A-Za-z0-9_.=,-])."""
    name = ",".join(f"{k}={format_value(v)}" for k, v in settings.items())
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", name)


def grid_points(grid: Grid) -> list[dict[str, Any]]:
    """The Cartesian product of the grid: one ``{key: value}`` per point, the first key varying slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in grid))]


def point_configs(base: TrainConfig, grid: Grid) -> list[tuple[str, dict[str, Any], TrainConfig]]:
    """(name, settings, config) per point; the config is ``base`` with the settings and ``output_dir`` =
    ``<base.output_dir>/<name>``, validated.

    Raises:
        ConfigError: a point whose settings are invalid together (e.g. a < b norms), or two points whose names
            coincide after sanitising.
    """
    out, seen = [], {}
    for settings in grid_points(grid):
        name = point_name(settings)
        if name in seen:
            raise ConfigError(f"Grid points {seen[name]} and {settings} share the directory name {name!r}; "
                              f"give values that differ after replacing characters outside A-Za-z0-9_.=,-")
        seen[name] = settings
        # a swept deal_profile brings its preset's values, under the point's own settings
        preset = PROFILES[settings["deal_profile"]] if "deal_profile" in settings else {}
        cfg = dataclasses.replace(base, output_dir=os.path.join(base.output_dir, name), **{**preset, **settings})
        try:
            validate(cfg)
            check_method_name(cfg.method)
        except ConfigError as err:
            raise ConfigError(f"Grid point {name}: {err}") from None
        out.append((name, settings, cfg))
    return out


def sweep_markdown(base: TrainConfig, grid: Grid, tasks: list[str], rows: list[dict], peak_reset: bool) -> str:
    """The paste-ready Markdown report: the fixed settings and one row per point."""
    keys = [k for k, _ in grid]
    lines = [
        "## Sweep over " + ", ".join(f"`{k}`" for k in keys),
        "",
        f"Method `{base.method}`; model `{base.model}`; tasks {' → '.join(tasks)}; seed {base.seed}; at most "
        f"{base.max_train_samples or 'all'} training rows per task; scored on "
        + (f"{base.validation_rows} validation rows per task (carved from the training files, never trained on); "
           if base.eval_split == "validation" else f"at most {base.max_test_samples or 'all'} test rows per task; ")
        + f"LoRA rank {base.lora_rank} on {', '.join(base.target_modules)}; {base.num_train_epochs} epoch(s) per "
        f"task (values of the swept keys as in each row).",
        "",
        "| " + " | ".join(keys) + " | AA (%) | BWT (%) | Trainable params | Trainable params (tasks 2+) | "
        "Wall time | Train ms/sample (tasks 2+) | Peak RSS |",
        "|" + "---|" * len(keys) + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_sample = r["later_train_seconds_per_sample"]
        later_params = r["later_trainable_parameters"]
        lines.append("| " + " | ".join(format_value(r["settings"][k]) for k in keys) + " | "
                     f"{format_pct(r['average_accuracy'])} | {format_pct(r['backward_transfer'], True)} | "
                     f"{r['trainable_parameters']:,} | {'n/a' if later_params is None else f'{later_params:,}'} | "
                     f"{format_duration(r['wall_seconds'])} | "
                     f"{'n/a' if per_sample is None else f'{1000 * per_sample:.1f}'} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    lines += [
        "",
        "AA: mean exact match over all tasks after the last task. BWT: mean over the earlier tasks of the final "
        "exact match minus the one just after training that task. Trainable params: the most any task trained "
        "(tasks 2+: the most any later task trained, i.e. DEAL's filter and MLP). Wall time: training and evaluation, summed over tasks. Train ms/sample (tasks 2+): training time divided "
        "by training samples over the tasks after the first (the tasks DEAL's filter and MLP train in; paper "
        "Table 7). Peak RSS: peak resident memory of the process"
        + ("." if peak_reset else " (could not be reset between points run in one process)."),
    ]
    return "\n".join(lines) + "\n"


def sweep(base: TrainConfig, grid: Grid) -> dict:
    """Run (or read back) every grid point under ``base.output_dir`` and write sweep.md / sweep.json.

    Returns:
        The ``sweep.json`` content: ``tasks``, ``config`` (the settings shared by all points, swept keys
        removed), ``grid`` (``{key: [values]}``), ``points`` (one row per point: ``point`` (its directory name),
        ``settings``, the keys of ``compare.run_summary``, ``output_dir``).
    Raises:
        ConfigError: invalid settings, or a finished run with other settings in a point's directory.
    """
    points = point_configs(base, grid)
    all_metrics, peak_reset = run_or_read([cfg for _, _, cfg in points], [name for name, _, _ in points])
    rows = [{"point": name, "settings": settings, **run_summary(metrics), "output_dir": cfg.output_dir}
            for (name, settings, cfg), metrics in zip(points, all_metrics)]
    tasks = all_metrics[0]["tasks"]
    swept = {k for k, _ in grid}
    shared = {k: v for k, v in base.to_dict().items() if k not in swept | {"output_dir", "overwrite_output_dir"}}
    result = {"tasks": tasks, "config": shared, "grid": {k: v for k, v in grid}, "points": rows}
    write_report(base.output_dir, result, SWEEP_JSON, sweep_markdown(base, grid, tasks, rows, peak_reset), SWEEP_MD)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train.sweep``; exit code 2 on bad input (as ``python -m deal_train``)."""
    parser = build_parser(prog="python -m deal_train.sweep",
                          description="Run one continual run per point of a grid of config values and write "
                                      "sweep.md / sweep.json under --output_dir.")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="A config key and the values to try (repeatable; the points are the Cartesian "
                             "product of all --grid options).")
    args = parser.parse_args(argv)

    def main_cfg(cfg: TrainConfig) -> None:
        quiet_libraries()  # before the trainer's libraries are imported (by ``compare.run_all``)
        sweep(cfg, parse_grid(args.grid))

    return run_cli(main_cfg, argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
