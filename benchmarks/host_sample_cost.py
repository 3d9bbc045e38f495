"""CPU time per sample of the streaming host path (read, decode, crop, copy into the batch), one process.

    python benchmarks/host_sample_cost.py /tmp/fmsq/train --size 28 --whole --repeat 6

Times ``StreamDataset.__getitems__`` over ``--batches`` batches of ``--batch`` distinct files (one untimed
batch first) and prints the microseconds per sample of each repeat and their median. ``--whole`` makes every
crop the whole image (RandomResizedCrop scale and ratio 1), as in the streamed vs in-memory comparison of
docs/imagenet.md. To compare two versions of the code, run it with each on ``PYTHONPATH``, alternately.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from peerdistill.data.stream import HostTransform, StreamDataset, scan_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a class-per-folder split")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--whole", action="store_true", help="crop the whole image (no RandomResizedCrop)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a worker
    crop = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)} if args.whole else {}
    ds = StreamDataset(scan_folder(args.folder), HostTransform(image_size=args.size, views=args.views, flip=True,
                                                               **crop))
    n = args.batch * (args.batches + 1)
    if len(ds) < n:
        raise SystemExit(f"{args.folder} has {len(ds)} images; --batch x (--batches + 1) needs {n}")
    keys = [[(0, i) for i in range(j * args.batch, (j + 1) * args.batch)] for j in range(args.batches + 1)]
    ds.__getitems__(keys[0])
    per_sample = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for k in keys[1:]:
            ds.__getitems__(k)
        per_sample.append(1e6 * (time.perf_counter() - t0) / (args.batch * args.batches))
    print(" ".join(f"{u:.1f}" for u in per_sample),
          f"-> median {statistics.median(per_sample):.1f} µs per sample ({args.views} view(s), {args.size} px)")


if __name__ == "__main__":
    main()
