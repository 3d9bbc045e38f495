"""``peerdistill correlate TSTDDEV.json RUN ...``: correlate the teacher's T. stddev with the test loss of KD
students trained with each augmentation (Good-DA-in-KD): Pearson, Spearman, Kendall and a scatter plot."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import PeerdistillError


def run(args: argparse.Namespace) -> None:
    from ..report.correlation import correlate, format_study, plot_correlation
    from ..fileio import write_json
    from ..report.table import load_runs

    path = Path(args.tstddev)
    try:
        tstddev = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeerdistillError(f"cannot read T. stddev results {path}: {' '.join(str(e).split())[:160]}") from None
    if not isinstance(tstddev, dict) or not isinstance(tstddev.get("results"), list):
        raise PeerdistillError(f"{path} is not the JSON of `peerdistill tstddev --out`")
    study = correlate(tstddev, load_runs([Path(d) for d in args.runs]), args.head, args.metric)
    for note in study["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(format_study(study))
    out = Path(args.out) if args.out else path.parent
    write_json(out / "correlation.json", study)
    print(f"wrote {out / 'correlation.json'} and {plot_correlation(study, out / 'correlation.png')}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("correlate", help="correlate T. stddev with the test loss of KD students (Good-DA-in-KD)")
    p.add_argument("tstddev", help="the JSON written by `peerdistill tstddev --out`")
    p.add_argument("runs", nargs="+", help="KD student run directories (method.extra_aug names the augmentation)")
    p.add_argument("--head", default="peer0", help="evaluated head of the students (default peer0)")
    p.add_argument("--metric", default="nll", choices=("nll", "top1", "top5", "ece"),
                   help="final test metric to correlate (default nll, the test loss)")
    p.add_argument("--out", help="folder for correlation.json and correlation.png (default: beside the JSON)")
    p.set_defaults(fn=run, trailing="runs")
