"""Fashion-MNIST comparison of methods at the same budget, several seeds: independent, DML, ONE,
SD-Dropout and DML + CutMix (the presets in configs/fmnist/), then a mean ± std table.

    python benchmarks/fmnist_comparison.py --seeds 0 1 --out runs/fmnist-comparison [key=value ...]

Extra ``key=value`` overrides apply to every run (e.g. ``epochs=2`` for a quicker look). Finished runs
are skipped, so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["independent", "dml", "one", "sd_dropout", "dml_cutmix"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fmnist-comparison")
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    dirs = []
    for preset in args.presets:
        for seed in args.seeds:
            out = args.out / f"{preset}-s{seed}"
            dirs.append(out)
            if (out / "summary.json").exists():
                continue
            cmd = [sys.executable, "-m", "peerdistill", "train", "-c", str(ROOT / "configs" / "fmnist" / f"{preset}.yaml"),
                   f"seed={seed}", "progress=false", *args.overrides]
            cmd += ["--resume", str(out)] if (out / "checkpoints" / "last.pt").exists() else ["--out", str(out)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    for which in ("final", "best"):
        print(f"\n{which}:")
        subprocess.run([sys.executable, "-m", "peerdistill", "table", "--which", which, *map(str, dirs)], check=True)


if __name__ == "__main__":
    main()
