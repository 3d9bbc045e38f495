"""Reference-style DML loop vs peerdistill vs the bare training step, in one process on one machine.

(a) ``reference_dml.py``: per-image numpy transforms in a 2-worker DataLoader, fp32, NCHW, one optimiser
    per peer — how public online-distillation code is written;
(b) peerdistill's DML with default settings (precision auto, channels_last auto) on the synthetic source
    shaped the same way (5000 CIFAR-100-shaped images, 2 x ResNet-32, batch 128);
(c) the bare step: the same peers' forward / cross-entropy / backward / SGD on a fixed pre-normalised
    batch in (b)'s precision and memory format, no data pipeline, no distillation.

Prints images/s through the cohort for each, and the ratios (b)/(a) (speed-up over the conventional
loop; target >= 2.5 on a 2-core CPU) and (b)/(c) (how close the engine gets to the bare step; target
>= 0.85). Each measurement is repeated ``--repeats`` times, interleaved, and the best run is kept
(the usual way to read through noise from other processes on a shared machine).

By default the timed window is one epoch of steps, so it holds exactly one epoch boundary: the
reference loop then pays its DataLoader's per-epoch worker start-up once, as it does in real training.
A shorter window inside an epoch (``--steps 30``) measures its mid-epoch rate instead.

On a GPU (``--device cuda``) the target is >= 3x; ``--fused`` adds a row for peerdistill with
``fused=true`` (one vmapped network for the homogeneous cohort).

    .venv/bin/python benchmarks/compare_reference.py [--steps N] [--device cuda] [--peers 4] [--fused] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_dml import run_reference  # noqa: E402

from peerdistill import config as C  # noqa: E402
from peerdistill.engine.bench import bare_step_throughput, run_bench  # noqa: E402


def peerdistill_config(size: int, batch_size: int, peers: int, model: str, device: str = "auto",
                       fused: bool = False) -> C.Config:
    return C.load(None, ["method=dml", f"model={model}", f"peers={peers}", f"batch_size={batch_size}",
                         "data.name=synthetic", f"data.size={size}", "data.num_classes=100",
                         "data.image_size=32", "data.channels=3", f"device={device}", f"fused={str(fused).lower()}"])


def main() -> None:
    p = argparse.ArgumentParser(description="reference DML loop vs peerdistill vs bare step")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per measurement (default: one epoch, size // batch size, so each loop pays "
                        "its once-per-epoch costs -- the reference's DataLoader worker start-up -- exactly once)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is kept")
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--model", default="resnet32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default: cores, max 4)")
    p.add_argument("--fused", action="store_true", help="also time peerdistill with fused=true")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args()
    a.steps = a.steps or a.size // a.batch_size
    target = 3.0 if a.device.startswith("cuda") else 2.5

    cfg = peerdistill_config(a.size, a.batch_size, a.peers, a.model, a.device)
    runs: dict[str, list[dict]] = {"reference": [], "peerdistill": [], "bare": []}
    if a.fused:
        runs["fused"] = []
    for _ in range(a.repeats):
        runs["reference"].append(run_reference(a.steps, a.warmup, a.size, a.batch_size, a.peers, a.workers,
                                               model=a.model, device=a.device))
        with contextlib.redirect_stdout(io.StringIO()):
            runs["peerdistill"].append(run_bench(cfg, a.steps, a.warmup, as_json=True))
            if a.fused:
                fcfg = peerdistill_config(a.size, a.batch_size, a.peers, a.model, a.device, fused=True)
                runs["fused"].append(run_bench(fcfg, a.steps, a.warmup, as_json=True))
        runs["bare"].append(bare_step_throughput(cfg, a.steps, a.warmup))
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    ref, pd, bare = (best[k]["images_per_s"] for k in ("reference", "peerdistill", "bare"))
    result = {
        "reference_images_per_s": ref, "peerdistill_images_per_s": pd, "bare_images_per_s": bare,
        "fused_images_per_s": best["fused"]["images_per_s"] if a.fused else None,
        "speedup_vs_reference": pd / ref, "fraction_of_bare": pd / bare, "target_speedup": target,
        "speedup_per_repeat": [b["images_per_s"] / r["images_per_s"]
                               for r, b in zip(runs["reference"], runs["peerdistill"])],
        "device": best["peerdistill"]["device"], "reference_workers": best["reference"]["workers"],
        "gpu_peak_mb": best["peerdistill"]["gpu_peak_mb"],
        "all_images_per_s": {k: [r["images_per_s"] for r in v] for k, v in runs.items()},
        "peerdistill_breakdown_ms": best["peerdistill"]["breakdown_ms"],
        "precision": best["peerdistill"]["precision"], "channels_last": best["peerdistill"]["channels_last"],
        "model": a.model, "peers": a.peers, "batch_size": a.batch_size, "size": a.size, "steps": a.steps,
        "warmup": a.warmup, "repeats": a.repeats, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if a.json:
        print(json.dumps(result))
        return
    fmt = "channels_last" if result["channels_last"] else "NCHW"
    print(f"{a.peers} x {a.model} on {result['device']}, batch {a.batch_size}, {a.size} CIFAR-100-shaped images, "
          f"{a.steps} timed steps, best of {a.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n{'':<44}{'images/s':>10}{'per peer':>10}   all runs")
    rows = [(f"(a) reference loop (fp32, NCHW, {result['reference_workers']} workers)", "reference"),
            (f"(b) peerdistill dml ({result['precision']}, {fmt})", "peerdistill"),
            (f"(c) bare step ({best['bare']['precision']}, {fmt})", "bare")]
    if a.fused:
        rows.append(("(b') peerdistill dml, fused=true", "fused"))
    for label, k in rows:
        r = best[k]
        runs_s = ", ".join(f"{x:.0f}" for x in result["all_images_per_s"][k])
        print(f"{label:<44}{r['images_per_s']:>10.1f}{r['images_per_s_per_peer']:>10.1f}   {runs_s}")
    per = ", ".join(f"{x:.2f}" for x in result["speedup_per_repeat"])
    print(f"\n(b)/(a) speed-up over the reference loop   {result['speedup_vs_reference']:.2f}x  (target >= {target}); "
          f"per repeat {per}")
    print(f"(b)/(c) fraction of the bare step          {result['fraction_of_bare']:.2f}   (target >= 0.85)")
    ms = result["peerdistill_breakdown_ms"]
    print("\npeerdistill step breakdown (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
