"""``python -m deal_train.bench``: the command line of the benchmark and the dispatch to its suites, the classic
DEAL/LoRA suite (``tools.bench``) and the fast-path suite (``tools.bench_fastpath``, which builds on the classic
suite's ``Bench``); one module above both, so neither imports the other in a circle."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from ..cli import quiet_libraries, run_cli
from ..config import TrainConfig
from ..outputs import atomic_write_json
from .bench import (BENCH_JSON, DEFAULT_OUTPUT_DIR, Bench, BenchOptions, build_bench_parser, format_table,
                    options_from_args)
from .bench_fastpath import TRL_HINT, FastpathBench, format_fastpath_table


def bench(cfg: TrainConfig, opts: BenchOptions) -> dict:
    """Run the benchmark (``opts.suite``), print the table and write ``<output_dir>/bench.json``; returns its
    content."""
    if opts.suite == "fastpath":
        fp = FastpathBench(cfg, opts)
        if opts.trl and not fp.trl:
            print(TRL_HINT, file=sys.stderr)
        result, table = fp.run(), format_fastpath_table
    else:
        result, table = Bench(cfg, opts).run(), format_table
    path = os.path.join(cfg.output_dir, BENCH_JSON)
    atomic_write_json(path, result)
    print(table(result) + f"\n\nRaw repeats in {path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deal_train.bench``; exit code 2 on bad input."""
    quiet_libraries()
    parser = build_bench_parser()
    args = parser.parse_args(argv)
    if args.output_dir is None:
        argv = [*(argv if argv is not None else sys.argv[1:]), "--output_dir", DEFAULT_OUTPUT_DIR]

    def main_cfg(cfg: TrainConfig) -> None:
        opts = options_from_args(args)
        if cfg.tasks:  # --tasks a,b (the TrainConfig key): the fastpath suite's tasks
            opts = dataclasses.replace(opts, tasks=tuple(cfg.tasks))
        bench(cfg, opts)

    return run_cli(main_cfg, argv, parser=parser)

