"""Training throughput of two variants of one config, interleaved in one process.

    python benchmarks/step_ratio.py data.name=imagefolder data.root=/tmp/fmsq data.image_size=28 \\
        data.padding=0 data.rrc_scale=[1,1] data.rrc_ratio=[1,1] data.crop_pct=1 model=resnet14 method=dml \\
        batch_size=128 --a data.stream=false --b data.stream=true data.workers=1 --rounds 24 --block 4

On a shared machine the speed of one config drifts by 10-20 % from one minute to the next, more than the
differences worth measuring (the streamed vs in-memory data path, a worker setting). Timing the two
variants in separate processes, even alternately, leaves that drift in every ratio. Here both trainers
(the same seed, so the same initial weights and batches) live in one process, and each round times a block
of ``--block`` steps of A then of B (the order alternating between rounds): each round's ratio B/A compares
steps taken seconds apart. A pause before each block lets the other variant's workers finish refilling their
prefetch queue, so they do not run into this block; a streamed variant still starts each block with its
queue full (2 batches per worker), which is up to 2/block of its decoding done ahead: use blocks of 10 or
more steps when the decoding's share of a step matters. Reports the median ratio of the rounds with a bootstrap 95 % interval, and each
variant's images/s over all its blocks and the time per step spent waiting for the next batch (the loader:
with ``data.workers=0`` the decoding itself). Workers of a streamed variant stay alive (persistent) while the
other variant runs; they sit idle once their prefetch queue is full.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from peerdistill import config as C
from peerdistill.engine.bench import bench_config
from peerdistill.engine.distributed import teardown
from peerdistill.engine.trainer import Trainer


def batches(trainer: Trainer):
    epoch = 0
    while True:
        trainer.train_loader.set_epoch(epoch)
        yield from trainer.train_loader
        epoch += 1


def block(trainer: Trainer, it, steps: int, fetch: list[float] | None = None) -> float:
    """Seconds for ``steps`` steps; ``fetch`` receives the seconds spent waiting for batches (host time:
    on a GPU the step's kernels run on asynchronously, so there it is not the step's share)."""
    t0 = time.perf_counter()
    terms = {}
    waited = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t
        terms = trainer.train_step(batch)
    trainer._check_finite(terms)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    if fetch is not None:
        fetch.append(waited)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="overrides shared by both variants")
    p.add_argument("-c", "--config")
    p.add_argument("--a", nargs="*", default=[], help="overrides of variant A (the reference)")
    p.add_argument("--b", nargs="*", default=[], help="overrides of variant B")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block", type=int, default=4, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds before each block, so the other variant's workers finish refilling their queue")
    p.add_argument("--json")
    args = p.parse_args()
    trainers = {v: Trainer(bench_config(C.load(args.config, [*args.overrides, *extra])), None)
                for v, extra in (("A", args.a), ("B", args.b))}
    its = {v: batches(t) for v, t in trainers.items()}
    for v, t in trainers.items():
        t.timer.enabled = False
        block(t, its[v], args.warmup)
    secs: dict[str, list[float]] = {"A": [], "B": []}
    fetch: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for v in ("AB" if r % 2 == 0 else "BA"):
            time.sleep(args.pause)
            secs[v].append(block(trainers[v], its[v], args.block, fetch[v]))
    teardown()
    ratios = np.array(secs["A"]) / np.array(secs["B"])  # B's throughput relative to A's
    rng = np.random.default_rng(0)
    boot = [float(np.median(rng.choice(ratios, len(ratios)))) for _ in range(2000)]
    bs = trainers["A"].cfg.batch_size
    report = {"a": args.a, "b": args.b, "shared": args.overrides, "rounds": args.rounds, "block": args.block,
              "images_per_s_a": bs * args.block * args.rounds / sum(secs["A"]),
              "images_per_s_b": bs * args.block * args.rounds / sum(secs["B"]),
              "median_ratio": float(np.median(ratios)),
              "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
              "ratios": [round(float(x), 4) for x in ratios],
              **{f"ms_per_step_{v.lower()}": 1000 * sum(secs[v]) / (args.rounds * args.block) for v in "AB"},
              **{f"fetch_ms_per_step_{v.lower()}": 1000 * sum(fetch[v]) / (args.rounds * args.block) for v in "AB"}, "threads": torch.get_num_threads(),
              "load": os.getloadavg()}
    for v, extra in (("a", args.a), ("b", args.b)):
        print(f"{v.upper()} {' '.join(extra) or '(shared)'}: {report[f'images_per_s_{v}']:.1f} images/s, "
              f"{report[f'ms_per_step_{v}']:.1f} ms per step of which {report[f'fetch_ms_per_step_{v}']:.1f} "
              f"waiting for the batch")
    print(f"B/A median of {args.rounds} rounds: {report['median_ratio']:.3f} "
          f"(bootstrap 95 % {report['ci95'][0]:.3f}-{report['ci95'][1]:.3f}); "
          f"spread of rounds {statistics.quantiles(ratios.tolist(), n=4)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
