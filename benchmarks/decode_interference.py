"""Does decoding a batch on the host slow the training step that follows it?

    python benchmarks/decode_interference.py /tmp/fmsq model=resnet14 method=dml batch_size=128 \
        data.image_size=28 data.padding=0 --rrc-scale 1 1

One in-memory trainer and one fixed batch; blocks of 5 steps, alternately run back to back ("idle") and
with a batch of the folder's JPEGs decoded (``StreamDataset``, one process, untimed) before each step
("decode"). Reports the median step time of each and the decode's own time: the difference between the
two step times is what the decoding costs the step beyond its own CPU time (caches, allocator, waking
threads), which a streamed run without workers pays on top of the decoding.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from peerdistill import config as C
from peerdistill.data.stream import HostTransform, StreamDataset, scan_folder
from peerdistill.engine.bench import bench_config
from peerdistill.engine.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="a folder with train/ (benchmarks/make_imagenet_like.py)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--rrc-scale", type=float, nargs=2, default=(0.08, 1.0),
                   help="RandomResizedCrop's area range of the decoded crops (1 1: the whole image)")
    args = p.parse_args()
    cfg = C.load(None, ["data.name=imagefolder", f"data.root={args.root}", "data.stream=false", *args.overrides])
    trainer = Trainer(bench_config(cfg), None)
    batch = next(iter(trainer.train_loader))
    size = batch.images.shape[-1]
    ds = StreamDataset(scan_folder(f"{args.root}/train"), HostTransform(image_size=size, flip=True,
                                                                       scale=tuple(args.rrc_scale)))
    n = len(batch.labels)
    keys = [[(0, i) for i in range(j * n, (j + 1) * n)] for j in range(len(ds) // n)]
    for _ in range(3):
        trainer.train_step(batch)
    step: dict[str, list[float]] = {"idle": [], "decode": []}
    decode: list[float] = []
    for r in range(args.rounds):
        for mode in ("idle", "decode") if r % 2 == 0 else ("decode", "idle"):
            for _ in range(5):
                if mode == "decode":
                    t = time.perf_counter()
                    ds.__getitems__(keys[len(decode) % len(keys)])
                    decode.append(time.perf_counter() - t)
                t0 = time.perf_counter()
                trainer.train_step(batch)
                step[mode].append(time.perf_counter() - t0)
    idle, after = np.array(step["idle"]) * 1000, np.array(step["decode"]) * 1000
    print(f"step back to back: median {np.median(idle):.1f} ms (mean {idle.mean():.1f}); after decoding a batch: "
          f"median {np.median(after):.1f} ms (mean {after.mean():.1f}); the decode itself: "
          f"median {1000 * np.median(decode):.1f} ms per batch of {n}")


if __name__ == "__main__":
    main()
