"""``peerdistill tstddev TEACHER [AUG ...]``: rank augmentations for KD by the teacher's T. stddev
(Good-DA-in-KD, spec §5.4); lower is better. Teacher inference only."""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from ..params import Option


def _opt(name: str) -> Option:
    """The argparse type of a :class:`~peerdistill.evaluation.tstddev.TStdDevOptions` field: its annotation."""
    from ..evaluation.tstddev import TStdDevOptions

    return Option(typing.get_type_hints(TStdDevOptions, include_extras=True)[name])


def run(args: argparse.Namespace) -> None:
    from ..evaluation.tstddev import TStdDevOptions, format_ranking, run_tstddev
    from ..fileio import write_json
    from ..text import plural

    opts = TStdDevOptions(epochs=args.epochs, batch_size=args.batch_size, group_iters=args.group_iters,
                          temperature=args.temperature, seed=args.seed, precision=args.precision,
                          device=args.device, threads=args.threads, teacher_peer=args.teacher_peer,
                          student=args.student, student_peer=args.student_peer, overrides=args.set or [],
                          progress=not args.no_progress)
    result = run_tstddev(args.teacher, args.augs, opts)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    groups = result["results"][0]["groups"] if result["results"] else 0
    print(f"T. stddev of {result['teacher']} ({result['dataset']}, {plural(result['epochs'], 'epoch')}, "
          f"{plural(groups, 'group')} of {result['group_iters']} x {result['batch_size']}, {result['precision']}, "
          f"{result['seconds']:.1f}s); lower is better")
    print(format_ranking(result))
    if args.out:
        write_json(Path(args.out), result)
        print(f"wrote {args.out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..data.augmentations import PAPER_AUGS

    p = sub.add_parser("tstddev", help="rank augmentations for KD by the teacher's T. stddev (Good-DA-in-KD)",
                       description="T. stddev of a teacher under each augmentation: groups of --group-iters "
                                   "iterations x (original + augmented batch of --batch-size), the mean "
                                   "softmax of each group, then the mean over classes of the std across groups.")
    p.add_argument("teacher", help="teacher run directory (its best.pt, else last.pt) or checkpoint")
    p.add_argument("augs", nargs="*", metavar="AUG",
                   help="augmentations: name or name:key=value,... (e.g. cutmixpick:criterion=student_entropy), "
                        f"'none' for the original batch alone; default: the paper's list ({', '.join(PAPER_AUGS)})")
    p.add_argument("--epochs", type=_opt("epochs"), default=10, help="passes over the training split (default 10)")
    p.add_argument("--batch-size", type=_opt("batch_size"), default=64, help="original images per iteration "
                   "(default 64)")
    p.add_argument("--group-iters", type=_opt("group_iters"), default=5, help="iterations per group mean (default 5)")
    p.add_argument("--temperature", type=_opt("temperature"), default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--seed", type=_opt("seed"), default=0)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="autocast precision (default: the teacher run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=_opt("threads"), default=0, help="CPU threads (default: torch's)")
    p.add_argument("--teacher-peer", type=_opt("teacher_peer"), default=0)
    p.add_argument("--student", help="student run for student-scored pickers (cutmixpick:criterion=student_entropy)")
    p.add_argument("--student-peer", type=_opt("student_peer"), default=0)
    p.add_argument("--set", action="append", metavar="data.KEY=VALUE",
                   help="change the teacher run's data config (e.g. --set data.root=DIR); repeatable")
    p.add_argument("--out", help="write the results as JSON here (the input of `peerdistill correlate`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=run, trailing="augs")
