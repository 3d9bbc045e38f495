"""``peerdistill eval RUN``: re-evaluate a saved run (or checkpoint) on its validation and test sets."""
from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> None:
    from ..engine.run import evaluate, format_table

    res = evaluate(args.path, args.checkpoint)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['checkpoint']} (epoch {res['epoch']})")
    for split in ("val", "test"):
        if res[split]:
            print(f"\n{split}:\n{format_table(res[split])}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="re-evaluate a saved run or checkpoint")
    e.add_argument("path", help="run directory or checkpoint file")
    e.add_argument("--checkpoint", default="last.pt", help="last.pt or best.pt when PATH is a directory")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=run)
