"""``peerdistill bench``: time training steps of any config."""
from __future__ import annotations

import argparse

from .. import config as C
from ..params import NonNegativeInt, Option, PositiveInt


def run(args: argparse.Namespace) -> None:
    from ..engine.bench import run_bench

    cfg = C.load(args.config, args.overrides)
    run_bench(cfg, steps=args.steps, warmup=args.warmup, as_json=args.json, epoch_size=args.epoch_size)


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="time training steps of any config")
    b.add_argument("-c", "--config")
    b.add_argument("--steps", type=Option(PositiveInt), default=20, help="timed steps (default 20)")
    b.add_argument("--warmup", type=Option(NonNegativeInt), default=5, help="untimed steps first (default 5)")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.add_argument("--epoch-size", type=Option(PositiveInt), default=None, metavar="N",
                   help="training images per epoch for the projected run time (default: this data's training "
                        "split; e.g. 50000 for CIFAR when benchmarking on synthetic data)")
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.set_defaults(fn=run, trailing="overrides")
