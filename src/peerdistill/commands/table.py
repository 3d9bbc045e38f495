"""``peerdistill table RUN ...``: mean ± std table of finished runs, grouped by config minus seed."""
from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    from ..report.table import load_runs, markdown_table

    print(markdown_table(load_runs([Path(d) for d in args.runs]), args.which))


def add_parser(sub: argparse._SubParsersAction) -> None:
    tb = sub.add_parser("table", help="mean ± std table of finished runs, grouped by config minus seed")
    tb.add_argument("runs", nargs="+", help="run directories")
    tb.add_argument("--which", choices=("final", "best"), default="final",
                    help="last epoch, or the epoch of best validation top-1 per head")
    tb.set_defaults(fn=run, trailing="runs")
