"""What each method's own work costs: `peerdistill bench` on every Fashion-MNIST preset, one table.

    .venv/bin/python benchmarks/method_overhead.py [--steps 20] [--warmup 5] [preset-stem ...] [-- key=value ...]

For each preset (default: every ``configs/fmnist/*.yaml`` but the Good-DA pair, which needs a teacher run)
it runs ``peerdistill bench`` in this process and prints one markdown row: images/s through the cohort, ms
per step, and the step breakdown in percent. The method's own work is the ``data`` phase (its views:
augmentation, mixing, extra inputs' preparation), its ``losses`` and its ``update`` (EMA copies, memory
banks, stored predictions); ``forward`` holds every network pass (the cohort, extra inputs, EMA copies,
a teacher) and ``backward``/``optimizer`` the rest. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from peerdistill import config as C
from peerdistill.engine.bench import run_bench

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("good_da_student", "good_da_teacher")  # a student needs a teacher run: see docs/good-da.md


def row(stem: str, overrides: list[str], steps: int, warmup: int) -> str:
    cfg = C.load(ROOT / "configs" / "fmnist" / f"{stem}.yaml", ["progress=false", "tensorboard=false", *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        r = run_bench(cfg, steps=steps, warmup=warmup, as_json=True)
    pct = r["breakdown_pct"]
    own = pct["data"] + pct["losses"] + pct["update"]
    return (f"| {stem} | {r['method']} ×{r['peers']} {r['model']} | {r['images_per_s']:.0f} | {r['step_ms']:.0f} | "
            f"{pct['data']:.1f} | {pct['forward']:.1f} | {pct['losses']:.1f} | {pct['backward']:.1f} | "
            f"{pct['optimizer']:.1f} | {pct['update']:.1f} | {pct['other']:.1f} | **{own:.1f}** | "
            f"{r['method_state_mb']:.1f} |")


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*", help="preset stems of configs/fmnist (default: all)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    stems = args.presets or sorted(p.stem for p in (ROOT / "configs" / "fmnist").glob("*.yaml") if p.stem not in SKIP)
    print("| preset | cohort | images/s | ms/step | data % | forward % | losses % | backward % | optimizer % | "
          "update % | other % | method's own work % | method state MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stem in stems:
        print(row(stem, overrides, args.steps, args.warmup), flush=True)


if __name__ == "__main__":
    main()
