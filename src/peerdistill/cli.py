"""The command line (DESIGN §5): the ``peerdistill`` parser, whose sub-commands are the modules of
:mod:`peerdistill.commands` (one per command), and the one-line error handling around them."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from . import plugins
from .commands import add_all
from .errors import PeerdistillError


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line naming the command, like every other bad input:
    ``error: peerdistill bench: argument --steps: must be int >= 1, got '0' (see peerdistill bench --help)``."""

    def error(self, message: str) -> NoReturn:
        raise PeerdistillError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line; a sub-command's ``trailing`` default names the list positional that also takes the
    words typed after its options (``tstddev TEACHER --epochs 1 cutmix``)."""
    p = Parser(prog="peerdistill", description="Knowledge distillation without (and with) a teacher.")
    sub = p.add_subparsers(dest="command", required=True)
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
