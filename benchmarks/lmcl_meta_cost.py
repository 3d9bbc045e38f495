"""Cost of L-MCL's meta step: milliseconds of one training step, of one meta step, and the meta step
amortised over ``meta_freq`` steps, for a small config on the current device. Usage::

    .venv/bin/python benchmarks/lmcl_meta_cost.py [--model resnet8] [--image 32] [--batch 64] \
        [--threads 1] [--repeats 5] [--device auto] [--precision fp32]

The data are synthetic (3 channels, 100 classes unless ``--classes``); the step is the engine's
``Trainer.train_step`` with the meta step switched off, the meta step is ``LMCL.meta_step`` on the same
batch. Best of ``--repeats`` (other processes share the machine). It also splits the ``losses`` phase of
``peerdistill bench`` into the forward of the auxiliary feature-refinement branches (networks L-MCL adds)
and the rest (projections, contrastive block, aggregators, KD).
"""
from __future__ import annotations

import argparse
import time

import torch

from peerdistill.config import load
from peerdistill.engine.trainer import Trainer


def best_ms(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--meta-freq", type=int, default=50)
    ap.add_argument("--precision", default="fp32", help="of the training step; the meta step always runs in fp32")
    a = ap.parse_args()
    cfg = load(None, ["data.name=synthetic", f"data.size={4 * a.batch}", f"data.image_size={a.image}",
                      f"data.num_classes={a.classes}", f"model={a.model}", f"batch_size={a.batch}", "method=lmcl",
                      "progress=false", "tensorboard=false", f"threads={a.threads}", f"device={a.device}", f"precision={a.precision}",
                      "data.val_split=0"])
    tr = Trainer(cfg, out_dir=None)
    batch = next(iter(tr.train_loader))
    rec = tr.step_record(batch)
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    meta_step = tr.method.meta_step
    tr.method.meta_step = lambda r: None  # time the plain step
    step = best_ms(lambda: tr.train_step(batch), a.repeats, sync)
    meta = best_ms(lambda: meta_step(rec), a.repeats, sync)
    with tr.precision.autocast():
        branches = best_ms(lambda: tr.method.stages(rec.outputs), a.repeats, sync)
        losses = best_ms(lambda: tr.method.losses(rec), a.repeats, sync)
    print(f"{a.model} {a.image}x{a.image} batch {a.batch} on {tr.device}, step in {a.precision}, {a.threads} thread(s)")
    print(f"  training step            {step:9.1f} ms")
    print(f"  meta step                {meta:9.1f} ms   ({meta / step:.1f} steps)")
    print(f"  losses phase             {losses:9.1f} ms   (auxiliary branches' forward {branches:.1f} ms, "
          f"the rest {losses - branches:.1f} ms)")
    print(f"  amortised (1/{a.meta_freq} steps) {meta / a.meta_freq:9.1f} ms   (+{100 * meta / a.meta_freq / step:.0f}% per step)")


if __name__ == "__main__":
    main()
