"""How many epochs does T. stddev need before its ranking of augmentations is stable?

    python studies/tstddev_stability.py TEACHER REFERENCE.json [--epochs 1 2 5] [--out runs/good_da/tstddev_stability.json]

Runs ``peerdistill tstddev TEACHER --epochs E`` for each E and compares its ranking of the augmentations with
the reference run's (the study's 10-epoch ranking): Kendall's tau and Spearman's rho (scipy.stats), the
augmentations in the same place, and the wall time of each run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def ranking(path: Path) -> dict[str, float]:
    return {r["aug"]: r["t_stddev"] for r in json.loads(path.read_text())["results"]}


def main() -> None:
    from scipy import stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("reference", type=Path)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5])
    ap.add_argument("--out", type=Path, default=Path("runs/good_da/tstddev_stability.json"))
    args = ap.parse_args()
    ref = ranking(args.reference)
    rows = []
    for e in args.epochs:
        path = args.out.parent / f"tstddev_e{e}.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peerdistill", "tstddev", args.teacher, "--epochs", str(e),
                        "--out", str(path), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        got = ranking(path)
        augs = sorted(set(ref) & set(got))
        tau = stats.kendalltau([ref[a] for a in augs], [got[a] for a in augs])
        rho = stats.spearmanr([ref[a] for a in augs], [got[a] for a in augs])
        order_ref, order_got = sorted(augs, key=ref.get), sorted(augs, key=got.get)
        rows.append({"epochs": e, "seconds": seconds, "kendall_tau": float(tau.statistic),
                     "kendall_p": float(tau.pvalue), "spearman_rho": float(rho.statistic),
                     "same_place": sum(a == b for a, b in zip(order_ref, order_got)), "augmentations": len(augs),
                     "top1_agrees": order_ref[0] == order_got[0]})
        print(f"{e:>3} epochs: Kendall tau {tau.statistic:+.3f}, Spearman {rho.statistic:+.3f}, "
              f"{rows[-1]['same_place']}/{len(augs)} in the same place, {seconds:.0f} s", flush=True)
    args.out.write_text(json.dumps({"teacher": args.teacher, "reference": str(args.reference), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
