"""``python -m deal_train.results`` (the results page) on real tiny runs, and
``scripts/reproduce_results.sh`` (syntax, dry listing, knobs)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import REPO
from deal_train.tools import compare, results

SCRIPT = REPO / "scripts" / "reproduce_results.sh"

# Two single-token labels (Good/Bad) and a high learning rate: the tiny random model learns something in 8 steps,
# so accuracies differ between methods and orders (an all-zero page could not catch a wrong mean).
TINY = ["--model", "tiny-random-llama", "--max_train_samples", "8", "--max_test_samples", "4",
        "--per_device_train_batch_size", "2", "--max_source_length", "96", "--max_new_tokens", "1",
        "--per_device_eval_batch_size", "4", "--learning_rate", "0.1", "--deal_learning_rate", "0.05",
        "--lora_rank", "4", "--deal_mlp_hidden", "8", "--validation_rows", "0"]
ORDERS = {1: "SST-2,IMDB", 2: "IMDB,SST-2"}


def _compare(out, tasks: str, methods: str, *extra: str) -> None:
    assert compare.main([*TINY, "--tasks", tasks, "--methods", methods, "--output_dir", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs in the script's layout: deal and seq_lora on two orders (o_lora missing); the curve's point at 8
    rows holds copies of order 1's runs (they trained 8 rows per task), its point at 16 rows is missing; the
    script's log."""
    root = tmp_path_factory.mktemp("results_runs")
    for order, tasks in ORDERS.items():
        _compare(root / results.order_dir(order), tasks, "deal,seq_lora")
    for m in ("deal", "seq_lora"):
        shutil.copytree(root / results.order_dir(1) / m, root / results.curve_dir(8) / m)
    # lines as the script writes them (printf '%s\t%s\t%s\t%s\t%s\n' start seconds rc label command): order 1's
    # deal stopped (143), then resumed by a later call of the script
    (root / results.LOG_FILE).write_text("2026-01-01T00:00:00Z\t12.5\t143\tstandard_order1/deal\tpython -m x\n"
                                         "2026-01-01T00:00:00Z\t20.0\t143\tsession\tMODEL=tiny scripts/x.sh\n"
                                         "2026-01-01T01:00:00Z\t3.5\t0\tstandard_order1/deal\tpython -m x\n"
                                         "2026-01-01T01:00:00Z\t60.0\t0\tsession\tMODEL=tiny scripts/x.sh\n")
    return root


def _summaries(root, group: str, methods) -> dict[str, dict]:
    return {m: compare.run_summary(results.load_run(str(root), group, m).metrics) for m in methods}


def _expected_cell(values, digits: int = 1, signed: bool = False) -> str:
    """mean ± sample std [min–max], computed here independently of deal_train.tools.results."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    return f"{f(mean)} ± {std:.{digits}f} [{f(min(values))}–{f(max(values))}]"


def _row(md: str, start: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_results_page_numbers_figures_and_missing_runs(runs, tmp_path):
    out = tmp_path / "docs" / "results.md"
    assert results.main(["--runs", str(runs), "--output", str(out), "--methods", "deal,seq_lora,o_lora",
                         "--orders", "1,2", "--curve_rows", "8,16"]) == 0
    md = out.read_text()
    per_order = {o: _summaries(runs, results.order_dir(o), ["deal", "seq_lora"]) for o in ORDERS}
    aa = {m: [per_order[o][m]["average_accuracy"] for o in ORDERS] for m in ("deal", "seq_lora")}
    assert len({round(v, 6) for vals in aa.values() for v in vals}) > 1, "the tiny runs should not all tie"

    # summary over orders: mean ± sample std [min–max] of the runs' own numbers
    for m in ("deal", "seq_lora"):
        s = [per_order[o][m] for o in ORDERS]
        cells = _row(md, f"| {m} | 2 of 2 |")
        assert cells[2] == _expected_cell([x["average_accuracy"] for x in s])
        assert cells[3] == _expected_cell([x["backward_transfer"] for x in s], signed=True)
        assert cells[4] == _expected_cell([x["average_rouge1"] for x in s])
        assert cells[5] == _expected_cell([x["wall_seconds"] / 60 for x in s])
        assert cells[6] == _expected_cell([x["peak_rss_bytes"] / 2**30 for x in s], digits=2)
        for o, tasks in ORDERS.items():  # per-order rows
            cells = _row(md, f"| {o} | {tasks.replace(',', ' → ')} | {m} |")
            x = per_order[o][m]
            assert cells[3:6] == ["finished", f"{x['average_accuracy']:.1f}", f"{x['backward_transfer']:+.1f}"]
            assert cells[9] == " / ".join(f"{v:.1f}" for v in x["average_accuracy_after_task"])

    # missing runs are reported, not fatal
    assert _row(md, "| o_lora |")[1:3] == ["0 of 2", results.NOT_RUN]
    for o, tasks in ORDERS.items():
        assert _row(md, f"| {o} | {tasks.replace(',', ' → ')} | o_lora |")[3] == results.NOT_RUN
    curve8 = _summaries(runs, results.curve_dir(8), ["deal", "seq_lora"])
    d8, s8 = curve8["deal"]["average_accuracy"], curve8["seq_lora"]["average_accuracy"]
    assert _row(md, "| 8 |") == ["8", f"{d8:.1f}", f"{s8:.1f}", f"{d8 - s8:+.1f}"]
    assert _row(md, "| 16 |") == ["16", results.NOT_RUN, results.NOT_RUN, "–"]
    t = results.load_run(str(runs), results.curve_dir(8), "deal").metrics["config"]["max_test_samples"]
    assert f"One test row moves a task's accuracy by {100 / t:.1f} points and AA by {100 / t / 2:.1f}" in md

    # the verdict, recomputed: best non-oracle method by mean AA and DEAL's gap to it
    mean = {m: sum(v) / len(v) for m, v in aa.items()}
    # 4 test rows per task: the paired interval contains 0, so the verdict makes no ranking claim
    if "**No ranking claim between DEAL and `seq_lora`**" in md:
        assert (f"is {mean['deal']:.1f}% for DEAL and {mean['seq_lora']:.1f}% for `seq_lora` "
                f"({mean['deal'] - mean['seq_lora']:+.1f} points), but the paired 95% interval") in md
        assert "DEAL has the best mean AA" not in md and "trails it by" not in md
    elif mean["deal"] > mean["seq_lora"] + 1e-9:
        assert (f"leading the next best, `seq_lora` ({mean['seq_lora']:.1f}%), by "
                f"{mean['deal'] - mean['seq_lora']:.1f} points") in md
    elif mean["seq_lora"] > mean["deal"] + 1e-9:
        assert (f"`seq_lora`'s {mean['seq_lora']:.1f}%; DEAL reaches {mean['deal']:.1f}% and trails it by "
                f"{mean['seq_lora'] - mean['deal']:.1f} points") in md
    else:
        assert "DEAL ties with `seq_lora`" in md
    assert "Not ranked (not finished on every order): `o_lora`" in md

    # figures: linked from the page, present, valid PNGs
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {os.path.basename(link) for link in links}
    assert names == {"aa_after_task_order1.png", "aa_after_task_order2.png", "accuracy_matrices_order1.png",
                     "accuracy_matrices_order2.png", "data_efficiency.png"}
    for link in links:
        path = out.parent / link
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
            img.verify()
    assert (tmp_path / "docs" / "results").is_dir()

    # the paper's numbers are labelled as the paper's; the time comes from the runs and the script's log
    assert "**The paper's numbers, not ours**" in md and "| DEAL | 87.7 | 78.5 |" in md
    assert "2 call(s) of the script taking 1 min 20 s" in md
    own = results.format_duration(per_order[1]["deal"]["wall_seconds"])
    assert _row(md, "| standard_order1/deal |")[1:6] == ["2026-01-01T00:00:00Z", "2", "16 s", "0", own]
    assert results.main(["--runs", str(tmp_path / "nope"), "--output", str(out)]) == 2


def test_results_page_with_nothing_run_yet(tmp_path):
    out = tmp_path / "results.md"
    (tmp_path / "runs").mkdir()
    assert results.main(["--runs", str(tmp_path / "runs"), "--output", str(out)]) == 0
    md = out.read_text()
    assert "**No verdict yet.**" in md and "Finished: 0 of 24 table runs and 0 of 8 data-efficiency runs" in md
    assert md.count(results.NOT_RUN) >= 21 + 8 and "No script log" in md
    assert not any((tmp_path / "results").iterdir())  # no figure without a run


def _dry(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=REPO, timeout=30,
                          env={**os.environ, "RESULTS_DRY_RUN": "1", "RESULTS_ROOT": str(tmp_path / "r"), **env})


def test_reproduce_script_syntax_and_dry_listing(tmp_path):
    from deal_train.cli import build_parser, config_from_args

    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    proc = _dry(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = [line for line in lines if line.startswith("run standard_order")]
    curve = [line for line in lines if line.startswith("run tc_rows")]
    assert len(table) == 24 and len(curve) == 8 and lines[-1].startswith("then: python -m deal_train.results")
    seen = set()
    for line in table + curve:
        label, command = line[len("run "):].split(": ", 1)
        argv = command.split()
        assert argv[:3] == ["python", "-m", "deal_train.compare"]
        parser = build_parser()
        parser.add_argument("--methods")
        args = parser.parse_args(argv[3:])
        cfg = config_from_args(args)  # every listed command is a valid configuration
        assert cfg.model == "smollm2-135m-instruct" and not cfg.eval_zero_shot and cfg.max_test_samples == 32
        assert cfg.eval_split == "test" and cfg.validation_rows == 100
        group = os.path.basename(cfg.output_dir)
        assert label == f"{group}/{args.methods}" and cfg.output_dir == str(tmp_path / "r" / group)
        if cfg.benchmark == "standard":
            assert group == results.order_dir(cfg.order) and cfg.max_train_samples == 64
        else:
            assert cfg.benchmark == "tc" and group == results.curve_dir(cfg.max_train_samples)
        seen.add((group, args.methods))
    assert seen == ({(results.order_dir(o), m) for o in results.TABLE_ORDERS for m in results.TABLE_METHODS}
                    | {(results.curve_dir(n), m) for n in results.CURVE_ROWS for m in results.CURVE_METHODS})
    assert not (tmp_path / "r").exists()  # a dry run writes nothing

    only = _dry(tmp_path, RESULTS_ONLY="curve", TRAIN_ROWS="8", MODEL="tiny-random-llama").stdout.splitlines()
    assert sum(line.startswith("run standard") for line in only) == 0
    assert sum(line.startswith("run tc_rows") for line in only) == 8
    assert all("--model tiny-random-llama" in line for line in only if line.startswith("run "))
    table_only = _dry(tmp_path, RESULTS_ONLY="table", TRAIN_ROWS="8").stdout
    assert table_only.count("run standard") == 24 and "--max_train_samples 8 " in table_only
    bad = _dry(tmp_path, RESULTS_ONLY="plots")
    assert bad.returncode == 2 and "RESULTS_ONLY=plots" in bad.stderr
    assert _dry(tmp_path, RESULTS_JOBS="0").returncode == 2


def test_budget_warning_ignores_keys_a_run_predates(runs, tmp_path):
    """A run saved before a config key existed ran at that key's legacy value (``config.LEGACY_DEFAULTS``, else its
    default): no warning for it, while a real difference of budget is still named."""
    group = results.order_dir(1)
    shutil.copytree(runs / group, tmp_path / group)
    path = tmp_path / group / "seq_lora" / "metrics.json"
    metrics = json.loads(path.read_text())
    for key in ("validation_rows", "profile_memory", "data_source"):  # 0 / false / cl_benchmark in both runs
        del metrics["config"][key]
    path.write_text(json.dumps(metrics))
    both = lambda: [results.load_run(str(tmp_path), group, m) for m in ("deal", "seq_lora")]  # noqa: E731
    assert not any("do not share one budget" in line for line in results.budget_text(both()))
    metrics["config"]["seed"] = 7
    path.write_text(json.dumps(metrics))
    warning = [line for line in results.budget_text(both()) if "do not share one budget" in line]
    assert len(warning) == 1 and "they differ in seed." in warning[0]


def test_the_page_names_no_absolute_runs_folder():
    from deal_train.tools.results import portable_paths

    text = "--runs /data/x/results --output docs/results.md | `--output_dir /data/x/results/standard_order1 `"
    assert portable_paths(text, "/data/x/results/") == \
        "--runs $RESULTS_ROOT --output docs/results.md | `--output_dir $RESULTS_ROOT/standard_order1 `"
    assert portable_paths("--runs outputs/results", "outputs/results") == "--runs outputs/results"  # relative: kept


def test_uncertainty_section_from_real_runs(runs, tmp_path):
    out = tmp_path / "results.md"
    assert results.main(["--runs", str(runs), "--output", str(out)]) == 0
    md = out.read_text()
    section = md.split("## Uncertainty", 1)[1].split("\n## ", 1)[0]
    assert "10,000 resamples" in section and "from the finished runs" in section
    assert "| `deal` | 1 |" in section and "| `seq_lora` | 1 |" in section
    assert "Order 1: `deal`" in section and ("excludes 0" in section or "contains 0" in section)


def test_uncertainty_section_power_without_runs(tmp_path):
    out = tmp_path / "results.md"
    (tmp_path / "runs").mkdir()
    assert results.main(["--runs", str(tmp_path / "runs"), "--output", str(out)]) == 0
    md = out.read_text()
    assert "500, 500, 439, 500 test rows (from the paper budget" in md
    assert f"{100 * results.stats.aa_standard_error([500, 500, 439, 500]):.2f} points" in md


def test_forgetting_section_from_real_runs(runs, tmp_path):
    """Order 1's earlier task (SST-2) after IMDB: the wrong count equals the rows the run's own exact match
    scored 0, and the three kinds add up to it."""
    out = tmp_path / "results.md"
    assert results.main(["--runs", str(runs), "--output", str(out)]) == 0
    section = out.read_text().split("## Where the forgetting goes", 1)[1].split("\n## ", 1)[0]
    for m in ("deal", "seq_lora"):
        cells = _row(section, f"| `{m}` | SST-2 |")
        folder = os.path.join(runs, results.order_dir(1), m, "predictions", "after_2-IMDB")
        em = results.stats.read_exact_match(results.stats.find_prediction_file(folder, 0, "SST-2"))
        assert int(cells[2]) == len(em) and int(cells[3]) == int((em == 0).sum())
        assert sum(int(c.split()[0]) for c in cells[4:7]) == int(cells[3])
    assert "`o_lora`" not in section  # not run: no line
