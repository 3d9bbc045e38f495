"""Milliseconds per batch of every Good-DA augmentation (peerdistill.data.augmentations) on the CPU.

AutoAugment is kornia's (``select=batch``: one sub-policy per batch, one kornia call; ``select=image``:
a sub-policy per image, one kornia call per distinct sub-policy). Usage::

    .venv/bin/python benchmarks/augmentation_speed.py [--threads 1] [--batch 64] [--repeats 20]
    .venv/bin/python benchmarks/augmentation_speed.py --policies [--size 224] [--batch 64] [--repeats 3]

Prints one line per augmentation and image format (Fashion-MNIST 1x28x28, CIFAR 3x32x32). With
``--policies``: RandAugment and TrivialAugment (``data.auto_augment``) placed on the device -- one call on the
batch after the host's crop, operations drawn per image (``select=image``) or per batch -- against the
placement in a host worker, which augments each sample alone (a batch of one per call).
"""
from __future__ import annotations

import argparse
import time

import torch

from peerdistill.data.batch_augment import BatchAugment
from peerdistill.data.augmentations import build_augmentation, parse_aug_spec
from peerdistill.data.views import ViewContext

AUGS = ["identity", "flip", "crop_flip", "cutout", "mixup", "cutmix", "autoaugment:select=batch",
        "autoaugment:select=image"]


def ms_per_batch(spec: str, channels: int, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per batch, the best of 3 rounds (CPU time is robust to a busy machine)."""
    gen = torch.Generator().manual_seed(0)
    ba = BatchAugment((0.5,) * channels, (0.25,) * channels, 4)
    ctx = ViewContext(lambda u: ba(u, gen), ba.normalize, None, gen, 1)
    aug = build_augmentation(*parse_aug_spec(spec))
    x = ba(torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8), gen)
    aug(x, ctx)  # warm-up
    wall = cpu = float("inf")
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            aug(x, ctx)
        wall = min(wall, (time.perf_counter() - t0) / repeats * 1000)
        cpu = min(cpu, (time.process_time() - c0) / repeats * 1000)
    return wall, cpu


def policy_rates(size: int, batch: int, repeats: int) -> None:
    """Images per CPU-second of each policy placement on 3 x size x size uint8 images."""
    from peerdistill.data.policy import PolicyAugment

    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name in ("randaugment", "trivialaugment"):
        placements = {"device, select=image": lambda p, g: p(x, g), "device, select=batch": lambda p, g: p(x, g),
                      "host worker, per sample": lambda p, g: [p(x[i:i + 1], g) for i in range(batch)]}
        for label, run in placements.items():
            pol = PolicyAugment(name, select="batch" if "batch" in label or "host" in label else "image")
            gen = torch.Generator().manual_seed(0)
            run(pol, gen)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                c0 = time.process_time()
                run(pol, gen)
                best = min(best, time.process_time() - c0)
            print(f"{name:<15} {label:<26} {batch / best:8.0f} images per CPU-second (3x{size}x{size})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--policies", action="store_true", help="RandAugment / TrivialAugment placements")
    p.add_argument("--size", type=int, default=224, help="image side for --policies")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.policies:
        policy_rates(args.size, args.batch, args.repeats)
        return
    for channels, size in ((1, 28), (3, 32)):
        for spec in AUGS:
            wall, cpu = ms_per_batch(spec, channels, size, args.batch, args.repeats)
            print(f"{channels}x{size}x{size}  {spec:<28} {wall:8.2f} ms wall {cpu:8.2f} ms CPU / batch of {args.batch}",
                  flush=True)


if __name__ == "__main__":
    main()
