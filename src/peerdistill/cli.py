"""``peerdistill train | list | bench | table`` and the commands of :mod:`peerdistill.commands`: the command
line (DESIGN §5)."""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from . import config as C
from .commands import add_all
from .errors import PeerdistillError


def _train(args: argparse.Namespace) -> None:
    from .engine.run import format_table, train

    if args.resume:
        if args.config:
            raise PeerdistillError("--resume reads the run's own config.yaml; -c cannot be combined with it")
        stored = Path(args.resume) / "config.yaml"
        if not stored.is_file():
            raise PeerdistillError(f"{args.resume} is not a run directory (no config.yaml)")
        cfg = C.load(stored, args.overrides)
    else:
        cfg = C.load(args.config, args.overrides)
    summary = train(cfg, args.out, args.resume)
    final = summary["final"]["test"]
    if final:
        print(f"\ntest set, last epoch ({summary['epochs']}); ECE in %, 15 bins; last column: the head's test "
              f"top-1 at its best validation epoch")
        print(format_table(final, summary["best"]))


def _fmt_params(params: dict[str, object]) -> str:
    items = [f"{k}={'<required>' if v is inspect.Parameter.empty else v!r}" for k, v in params.items()]
    return ", ".join(items) or "-"


def _list(args: argparse.Namespace) -> None:
    from .data import DATASETS
    from .data.mix import MIXERS
    from .data.augmentations import AUGMENTATIONS
    from .methods import ADDONS, METHODS
    from .models import MODELS

    for title, reg, skip in (("methods", METHODS, ()), ("add-ons", ADDONS, ()),
                             ("models", MODELS, ("num_classes", "in_channels")),
                             ("datasets", DATASETS, ()), ("mixers", MIXERS, ()),
                             ("augmentations (kd method.extra_aug, tstddev)", AUGMENTATIONS, ())):
        print(f"{title}:")
        for name in reg:
            params = {k: v for k, v in reg.params(name).items() if k not in skip}
            doc = " ".join((inspect.getdoc(reg.get(name)) or "").split("\n\n")[0].split())
            print(f"  {name:<16} {doc}")
            if params:
                print(f"  {'':<16}   {_fmt_params(params)}")
        print()


def _bench(args: argparse.Namespace) -> None:
    from .engine.bench import run_bench

    cfg = C.load(args.config, args.overrides)
    run_bench(cfg, steps=args.steps, warmup=args.warmup, as_json=args.json, epoch_size=args.epoch_size)


def _table(args: argparse.Namespace) -> None:
    from .report.table import load_runs, markdown_table

    print(markdown_table(load_runs([Path(d) for d in args.runs]), args.which))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peerdistill", description="Knowledge distillation without (and with) a teacher.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a run (default: 2-peer DML on Fashion-MNIST)")
    t.add_argument("-c", "--config", help="YAML preset")
    t.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. method=dml method.temperature=2 epochs=3")
    t.set_defaults(fn=_train)
    ls = sub.add_parser("list", help="models, methods, datasets and mixers with their hyper-parameters")
    ls.set_defaults(fn=_list)
    b = sub.add_parser("bench", help="time training steps of any config")
    b.add_argument("-c", "--config")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.add_argument("--epoch-size", type=int, default=None, metavar="N",
                   help="training images per epoch for the projected run time (default: this data's training "
                        "split; e.g. 50000 for CIFAR when benchmarking on synthetic data)")
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.set_defaults(fn=_bench)
    tb = sub.add_parser("table", help="mean ± std table of finished runs, grouped by config minus seed")
    tb.add_argument("runs", nargs="+", help="run directories")
    tb.add_argument("--which", choices=("final", "best"), default="final",
                    help="last epoch, or the epoch of best validation top-1 per head")
    tb.set_defaults(fn=_table)
    add_all(sub)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may come before or after the options
    (``train --out DIR threads=1`` and ``train threads=1 --out DIR`` mean the same)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        code = args.fn(args)  # a command may return its exit status (sweep: 1 if a run did not finish)
    except PeerdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a fault of the machine (disk full, permissions) outside the guarded writes
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {(e.strerror or str(e)).lower()}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a run's last completed epoch is in its checkpoints/last.pt (continue with --resume)",
              file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
