"""Write ImageNet-like JPEG class folders from Fashion-MNIST (the input of benchmarks/input_pipeline.py).

    python benchmarks/make_imagenet_like.py /tmp/il1k --train 1000
    python benchmarks/make_imagenet_like.py /tmp/il10k --train 10000 --val 500
    python benchmarks/make_imagenet_like.py /tmp/fmsq --train 6000 --val 2000 --sides 28 28 --square --light

Each image is a garment tinted over a colour gradient, upscaled to a shorter side of 200-500 px at an
aspect ratio of 3/4-4/3, noised to a target file size of 75-110 KB and saved at JPEG quality 90
(tests/imagenet_like.py; the smallest images cannot carry that many bytes and stay smaller). The same
arguments always write the same bytes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.imagenet_like import make_imagenet_like  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", type=int, nargs=2, default=(200, 500), help="range of the shorter side (px)")
    p.add_argument("--square", action="store_true", help="aspect ratio 1 instead of 3/4-4/3")
    p.add_argument("--light", action="store_true", help="a fixed light noise instead of the 75-110 KB targets")
    a = p.parse_args()
    t = time.time()
    sizes = make_imagenet_like(a.root, a.train, a.val, a.classes, a.seed, sides=tuple(a.sides),
                               target_kb=None if a.light else (75, 110), aspect=(1, 1) if a.square else (3 / 4, 4 / 3))
    kb = np.concatenate([np.array(v) for v in sizes.values()]) / 1024
    print(f"{a.root}: {len(kb)} JPEGs in {time.time() - t:.0f}s; size KB mean {kb.mean():.1f}, "
          f"5/50/95th percentile {np.percentile(kb, 5):.1f}/{np.median(kb):.1f}/{np.percentile(kb, 95):.1f}, "
          f"{np.mean((kb >= 75) & (kb <= 110)):.0%} within 75-110")


if __name__ == "__main__":
    main()
