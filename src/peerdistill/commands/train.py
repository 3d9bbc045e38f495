"""``peerdistill train``: train a run, or continue one with ``--resume``."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import config as C
from ..errors import PeerdistillError


def run(args: argparse.Namespace) -> None:
    from ..run import format_table, train

    if args.resume:
        if args.config:
            raise PeerdistillError("--resume reads the run's own config.yaml; -c cannot be combined with it")
        stored = Path(args.resume) / "config.yaml"
        if not stored.is_file():
            raise PeerdistillError(f"{args.resume} is not a run directory (no config.yaml)")
        cfg = C.load(stored, args.overrides, stored=True)
    else:
        cfg = C.load(args.config, args.overrides)
    summary = train(cfg, args.out, args.resume)
    final = summary["final"]["test"]
    if final:
        print(f"\ntest set, last epoch ({summary['epochs']}); ECE in %, 15 bins; last column: the head's test "
              f"top-1 at its best validation epoch")
        print(format_table(final, summary["best"]))


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a run (default: 2-peer DML on Fashion-MNIST)")
    t.add_argument("-c", "--config", help="YAML preset")
    t.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. method=dml method.temperature=2 epochs=3")
    t.set_defaults(fn=run, trailing="overrides")
