"""``peerdistill train | list | bench | table`` and the commands of :mod:`peerdistill.commands`: the command
line (DESIGN §5)."""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import NoReturn

from . import config as C
from . import plugins
from .commands import add_all
from .errors import PeerdistillError
from .params import NonNegativeInt, Option, PositiveInt


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line naming the command, like every other bad input:
    ``error: peerdistill bench: argument --steps: must be int >= 1, got '0' (see peerdistill bench --help)``."""

    def error(self, message: str) -> NoReturn:
        raise PeerdistillError(f"{self.prog}: {message} (see {self.prog} --help)")


def _train(args: argparse.Namespace) -> None:
    from .engine.run import format_table, train

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


def _fmt_params(params: dict[str, object]) -> str:
    items = [f"{k}={'<required>' if v is inspect.Parameter.empty else v!r}" for k, v in params.items()]
    return ", ".join(items) or "-"


def _list(args: argparse.Namespace) -> None:
    from .config_keys import config_markdown, config_text
    from .data import DATASETS
    from .data.mix import MIXERS
    from .data.augmentations import AUGMENTATIONS
    from .methods import ADDONS, METHODS
    from .models import MODELS

    if args.what == "config":
        print(config_markdown() if args.markdown else config_text(), end="" if args.markdown else "\n")
        return
    if args.markdown:
        raise PeerdistillError("--markdown is for `peerdistill list config`")
    sections = {"methods": ("methods", METHODS, ()), "add-ons": ("add-ons", ADDONS, ()),
                "models": ("models", MODELS, ("num_classes", "in_channels")),
                "datasets": ("datasets (data.name; their parameters are data.<parameter>)", DATASETS, ("root",)),
                "mixers": ("mixers", MIXERS, ()),
                "augmentations": ("augmentations (kd method.extra_aug, tstddev)", AUGMENTATIONS, ())}
    for key, (title, reg, skip) in sections.items():
        if args.what not in (None, key):
            continue
        print(f"{title}:")
        for name in reg:
            params = {k: v for k, v in reg.params(name).items() if k not in skip}
            doc = " ".join((inspect.getdoc(reg.get(name)) or "").split("\n\n")[0].split())
            print(f"  {name:<16} {doc}")
            if params:
                print(f"  {'':<16}   {_fmt_params(params)}")
        print()
    if args.what is None:
        print("the general config keys (optim.*, data.*, epochs, ...): peerdistill list config")


def _bench(args: argparse.Namespace) -> None:
    from .engine.bench import run_bench

    cfg = C.load(args.config, args.overrides)
    run_bench(cfg, steps=args.steps, warmup=args.warmup, as_json=args.json, epoch_size=args.epoch_size)


def _table(args: argparse.Namespace) -> None:
    from .report.table import load_runs, markdown_table

    print(markdown_table(load_runs([Path(d) for d in args.runs]), args.which))


def build_parser() -> argparse.ArgumentParser:
    """The command line; a sub-command's ``trailing`` default names the list positional that also takes the
    words typed after its options (``tstddev TEACHER --epochs 1 cutmix``)."""
    p = Parser(prog="peerdistill", description="Knowledge distillation without (and with) a teacher.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a run (default: 2-peer DML on Fashion-MNIST)")
    t.add_argument("-c", "--config", help="YAML preset")
    t.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. method=dml method.temperature=2 epochs=3")
    t.set_defaults(fn=_train, trailing="overrides")
    ls = sub.add_parser("list", help="methods, models, datasets, mixers with their parameters; the config keys")
    ls.add_argument("what", nargs="?", choices=("methods", "add-ons", "models", "datasets", "mixers", "augmentations",
                                                "config"), help="one section (default: every registry)")
    ls.add_argument("--markdown", action="store_true", help="config keys as the Markdown of docs/config.md")
    ls.set_defaults(fn=_list)
    b = sub.add_parser("bench", help="time training steps of any config")
    b.add_argument("-c", "--config")
    b.add_argument("--steps", type=Option(PositiveInt), default=20, help="timed steps (default 20)")
    b.add_argument("--warmup", type=Option(NonNegativeInt), default=5, help="untimed steps first (default 5)")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.add_argument("--epoch-size", type=Option(PositiveInt), default=None, metavar="N",
                   help="training images per epoch for the projected run time (default: this data's training "
                        "split; e.g. 50000 for CIFAR when benchmarking on synthetic data)")
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.set_defaults(fn=_bench, trailing="overrides")
    tb = sub.add_parser("table", help="mean ± std table of finished runs, grouped by config minus seed")
    tb.add_argument("runs", nargs="+", help="run directories")
    tb.add_argument("--which", choices=("final", "best"), default="final",
                    help="last epoch, or the epoch of best validation top-1 per head")
    tb.set_defaults(fn=_table, trailing="runs")
    add_all(sub)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; a command's list positional (``key=value`` overrides, tstddev's augmentations,
    run folders) may come before or after the options (``train --out DIR threads=1`` and
    ``train threads=1 --out DIR`` mean the same). A mistake raises a one-line :class:`PeerdistillError`."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    trailing = getattr(args, "trailing", None)
    stray = [a for a in rest if a.startswith("-") or trailing is None]
    if stray:
        Parser(prog=f"{parser.prog} {args.command}").error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        setattr(args, trailing, [*(getattr(args, trailing) or []), *rest])
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        plugins.load_entry_points()  # installed packages' models, methods, ... for every command
        args = parse(argv)
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
