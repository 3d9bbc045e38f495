"""Every speed figure the performance doc asks of a machine, in one command (GPU or CPU).

For 2 x and 4 x ResNet-32 DML on CIFAR-100-shaped data (50 000 training images of 32x32x3, 100
classes, 10 000 test images, batch 128), fused and not:

* ``peerdistill bench`` in a fresh process: images/s through the cohort and per peer, step time,
  peak RSS, GPU peak memory and host synchronisations per step (CUDA), and the projected wall time of
  a 300-epoch run (epochs x (one training epoch + one evaluation of the test set));
* ``compare_reference.py`` for the same cohorts: the conventional loop on the same device, and the
  speed-up over it.

Prints a markdown table and, with ``--out DIR``, writes every raw JSON record to ``DIR/suite.json``.

    .venv/bin/python benchmarks/device_suite.py [--out DIR] [--steps 50] [--peers 2 4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from peerdistill.text import format_duration
from peerdistill.fileio import atomic_write

HERE = Path(__file__).resolve().parent
CIFAR100_SHAPE = ["method=dml", "model=resnet32", "batch_size=128", "epochs=300", "data.name=synthetic",
                  "data.size=50000", "data.test_size=10000", "data.val_split=0", "data.num_classes=100",
                  "data.image_size=32", "data.channels=3"]


def last_json(cmd: list[str]) -> dict:
    """Run ``cmd`` and parse the JSON object on its last output line; a failure becomes ``{"error": ...}``
    so one failing measurement does not lose the others."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "cmd": " ".join(cmd[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=50, help="timed bench steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reference-repeats", type=int, default=2)
    p.add_argument("--size", type=int, default=50000, help="training images (CIFAR-100: 50000)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = [o if not o.startswith("data.size=") else f"data.size={a.size}" for o in CIFAR100_SHAPE]
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    records: dict[str, list[dict]] = {"bench": [], "reference": []}

    def add(kind: str, record: dict) -> None:
        records[kind].append(record)
        if "error" in record:
            print(f"failed: {record['cmd']}\n  {record['error']}", file=sys.stderr, flush=True)
        if a.out:  # after every measurement, so an interrupted suite keeps what it measured
            text = json.dumps({"device": name, **records}, indent=1).encode()
            atomic_write(a.out / "suite.json", lambda f: f.write(text))

    for peers in a.peers:
        for fused in (False, True):
            cmd = [sys.executable, "-m", "peerdistill", "bench", *shape, f"peers={peers}",
                   f"fused={str(fused).lower()}", "--steps", str(a.steps), "--warmup", str(a.warmup), "--json"]
            add("bench", last_json(cmd))
        if not a.skip_reference:
            cmd = [sys.executable, str(HERE / "compare_reference.py"), "--peers", str(peers), "--device", device,
                   "--repeats", str(a.reference_repeats), "--json"]
            add("reference", last_json(cmd))
    records = {k: [r for r in v if "error" not in r] for k, v in records.items()}
    print(f"## DML ResNet-32 on {name}, torch {torch.__version__}, CIFAR-100 shape, batch 128\n")
    print("| peers | fused | images/s (cohort) | per peer | step ms | GPU peak MB | peak RSS MB | host syncs/step "
          "| 300 epochs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records["bench"]:
        gpu = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "–"
        syncs = f"{r['host_syncs_per_step']:.1f}" if r["host_syncs_per_step"] is not None else "–"
        print(f"| {r['peers']} | {'yes' if r['fused'] else 'no'} | {r['images_per_s']:.0f} | "
              f"{r['images_per_s_per_peer']:.0f} | {r['step_ms']:.1f} | {gpu} | {r['peak_rss_mb']:.0f} | {syncs} | "
              f"{format_duration(r['projected_run_s'])} |")
    if records["reference"]:
        print("\n| peers | reference images/s | peerdistill images/s | bare step images/s | speed-up | of bare step |")
        print("|---|---|---|---|---|---|")
        for r in records["reference"]:
            print(f"| {r['peers']} | {r['reference_images_per_s']:.0f} | {r['peerdistill_images_per_s']:.0f} | "
                  f"{r['bare_images_per_s']:.0f} | {r['speedup_vs_reference']:.2f}x (target {r['target_speedup']}) | "
                  f"{r['fraction_of_bare']:.2f} |")


if __name__ == "__main__":
    main()
