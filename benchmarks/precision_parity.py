"""Accuracy parity of the fast defaults (precision auto, channels_last) against fp32 NCHW (DESIGN §7).

Trains 2-peer DML on Fashion-MNIST with both settings for several seeds on a short budget and writes a
markdown table of mean ± std final test top-1 (peers' mean and ensemble) and seconds per epoch.

    .venv/bin/python benchmarks/precision_parity.py --seeds 0 1 2 --output runs/precision_parity.md

Takes about (fp32 + default) seconds/epoch x epochs x seeds; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from peerdistill import config as C
from peerdistill.engine.precision import resolve_device, resolve_precision
from peerdistill.run import train

SETTINGS = {
    "fp32, NCHW": ["precision=fp32", "channels_last=false"],
    "defaults (precision auto, channels_last auto)": [],
}


def one_run(base: list[str], extra: list[str], seed: int, out: Path) -> dict[str, float]:
    cfg = C.load(None, [*base, *extra, f"seed={seed}", "tensorboard=false", "progress=false"])
    t0 = time.perf_counter()
    summary = train(cfg, out, echo=False)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    test = summary["final"]["test"]
    return {"peers_top1": test["peers_mean"]["top1"], "ensemble_top1": test["ensemble"]["top1"],
            "seconds_per_epoch": statistics.mean(r["seconds"] for r in lines),
            "wall_seconds": time.perf_counter() - t0}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def table(results: dict[str, list[dict[str, float]]], base: list[str]) -> str:
    lines = [f"2-peer DML on Fashion-MNIST, `{' '.join(base)}`, {len(next(iter(results.values())))} seeds; "
             f"final-epoch test top-1 (%), mean ± std over seeds; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads.", "",
             "| setting | precision | peers' mean top-1 | ensemble top-1 | s/epoch (train) |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {runs[0]['precision']} | {mean_std([r['peers_top1'] for r in runs])} | "
                     f"{mean_std([r['ensemble_top1'] for r in runs])} | "
                     f"{statistics.mean(r['seconds_per_epoch'] for r in runs):.1f} |")
    lines += ["", "Per run (peers' mean top-1, ensemble top-1, s/epoch):", ""]
    for name, runs in results.items():
        per = "; ".join(f"seed {r['seed']}: {r['peers_top1']:.2f}, {r['ensemble_top1']:.2f}, "
                        f"{r['seconds_per_epoch']:.1f}" for r in runs)
        lines.append(f"- {name}: {per}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description="fp32 NCHW vs default precision / memory format, several seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output", default="runs/precision_parity.md", help="markdown table to write")
    p.add_argument("--json", action="store_true", help="also print the raw results as one JSON line")
    p.add_argument("overrides", nargs="*", default=["model=resnet8", "epochs=2", "data.train_subset=20000"],
                   help="the shared budget (default: model=resnet8 epochs=2 data.train_subset=20000)")
    a = p.parse_args()
    base = ["method=dml", "peers=2", "data.name=fashion_mnist", *a.overrides]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        for seed in a.seeds:  # interleave the settings so machine noise hits both alike
            for name, extra in SETTINGS.items():
                prec = resolve_precision(C.load(None, [*base, *extra]).precision, resolve_device("auto")).name
                r = one_run(base, extra, seed, Path(tmp) / f"{name[:4]}-{seed}")
                results[name].append({**r, "seed": seed, "precision": prec})
                print(f"{name}, seed {seed}: peers {r['peers_top1']:.2f}, ensemble {r['ensemble_top1']:.2f}, "
                      f"{r['seconds_per_epoch']:.1f} s/epoch", file=sys.stderr, flush=True)
    md = table(results, base)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(md)
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
