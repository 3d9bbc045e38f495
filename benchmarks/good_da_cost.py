"""CPU cost of the Good-DA Fashion-MNIST study's training steps (docs/good-da.md §6).

Measures ``time.process_time`` per training step of 128 images on ONE thread -- robust to a machine busy
with other jobs, unlike wall time -- for candidate teachers and for KD students with an extra augmented
batch; wall time on 2 idle cores is about CPU / 2. Teachers for the KD steps are 1-epoch throw-away runs
(their weights do not change the cost). Usage: ``.venv/bin/python benchmarks/good_da_cost.py [--steps 6]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from peerdistill.config import load
from peerdistill.run import train
from peerdistill.engine.trainer import Trainer

FM = ["data.name=fashion_mnist", "data.train_subset=2000", "progress=false", "tensorboard=false", "threads=1",
      "batch_size=128"]


def step_cpu_seconds(over: list[str], steps: int) -> float:
    tr = Trainer(load(None, [*FM, *over]))
    it = iter(tr.train_loader)
    tr.train_step(next(it))  # warm-up
    t0 = time.process_time()
    for _ in range(steps):
        tr.train_step(next(it))
    return (time.process_time() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gooda-cost-"))
    teachers = {}
    for m in ("resnet56", "resnet20"):
        teachers[m] = tmp / m
        train(load(None, [*FM, "method=independent", "peers=1", f"model={m}", "epochs=1", "data.train_subset=256"]),
              out_dir=teachers[m], echo=False)
    cases = [(f"teacher {m}", ["method=independent", "peers=1", f"model={m}"])
             for m in ("resnet56", "resnet20", "resnet14", "resnet8")]
    cases += [(f"kd {t}->resnet8 {aug}", ["method=kd", f"method.teacher={teachers[t]}", "peers=1", "model=resnet8",
                                          f"method.extra_aug={aug}"])
              for t, aug in (("resnet56", "cutmix"), ("resnet20", "cutmix"), ("resnet20", "autoaugment"),
                             ("resnet20", "cutmixpick"))]
    for name, over in cases:
        s = step_cpu_seconds(over, args.steps)
        print(f"{name:<32} {s * 1000:7.0f} CPU-ms / step of 128   {s * 54000 / 128:6.0f} CPU-s / 54k-image epoch",
              flush=True)


if __name__ == "__main__":
    main()
