"""A conventional research-style DML training loop, the yardstick for ``compare_reference.py``.

Written the way public online-distillation code bases are (DML / ONE / OKDDip / KDCL re-implementations):
a ``torch.utils.data.Dataset`` that augments one image at a time in Python/numpy (random crop with
4-pixel zero padding, horizontal flip, ToTensor, Normalize), a ``DataLoader`` with 2 worker processes,
fp32 in NCHW, one forward per peer, KL to the detached other peers, and one SGD optimiser per peer
stepped in turn, with the per-step ``loss.item()`` / accuracy book-keeping those loops do.

The data is CIFAR-100-shaped random uint8 (32x32x3, 100 classes) and the peers are
``peerdistill.models.build_model("resnet32")``, so the networks are exactly the ones peerdistill trains.

On a GPU (``--device cuda``) it does what those code bases do there: ``pin_memory=True`` loaders,
``x.cuda(non_blocking=True)``, fp32 NCHW models on the device, and the per-step ``.item()`` meters.

Run alone:  .venv/bin/python benchmarks/reference_dml.py --steps 30 [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from peerdistill.models import build_model

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class RandomCifarLike(Dataset):
    """N random uint8 HWC images with labels, augmented per sample like torchvision's CIFAR recipe."""

    def __init__(self, n: int = 5000, num_classes: int = 100, size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, num_classes, size=n).astype(np.int64)
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        # RandomCrop(32, padding=4)
        padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="constant")
        top, left = np.random.randint(0, 9, size=2)
        img = padded[top:top + 32, left:left + 32]
        # RandomHorizontalFlip()
        if np.random.rand() < 0.5:
            img = img[:, ::-1]
        # ToTensor(): HWC uint8 -> CHW float in [0, 1]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div(255.0)
        # Normalize(mean, std)
        x = x.sub_(self.mean).div_(self.std)
        return x, int(self.labels[i])


class AverageMeter:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n


def kl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), batch mean, as DML re-implementations write it."""
    return F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher.detach(), dim=1), reduction="batchmean")


def default_workers() -> int:
    """One worker per core up to 4, the usual ``--workers`` of CIFAR research code."""
    return min(4, os.cpu_count() or 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(models: list[nn.Module], optimizers: list[torch.optim.Optimizer], loader: DataLoader,
                steps: int, state: dict, device: torch.device = torch.device("cpu")) -> None:
    """Run ``steps`` DML steps, starting new loader epochs as needed (``state`` keeps the iterator)."""
    n = len(models)
    losses = [AverageMeter() for _ in models]
    top1 = [AverageMeter() for _ in models]
    for _ in range(steps):
        try:
            x, y = next(state["it"])
        except (StopIteration, KeyError):
            state["it"] = iter(loader)
            x, y = next(state["it"])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        outputs = [m(x) for m in models]
        for i in range(n):
            ce = F.cross_entropy(outputs[i], y)
            kl = sum(kl_loss(outputs[i], outputs[j]) for j in range(n) if j != i)
            loss = ce + kl / (n - 1)
            optimizers[i].zero_grad()
            loss.backward()
            optimizers[i].step()
            losses[i].update(loss.item(), x.size(0))
            top1[i].update((outputs[i].argmax(1) == y).float().mean().item() * 100.0, x.size(0))


def run_reference(steps: int = 30, warmup: int = 5, size: int = 5000, batch_size: int = 128, peers: int = 2,
                  workers: int | None = None, model: str = "resnet32", num_classes: int = 100, seed: int = 0,
                  device: str = "cpu") -> dict:
    """Time ``steps`` steps of the reference loop after ``warmup``; images/s through the cohort."""
    dev = torch.device(device)
    workers = default_workers() if workers is None else workers
    torch.manual_seed(seed)
    np.random.seed(seed)
    data = RandomCifarLike(size, num_classes, seed=seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=dev.type == "cuda")
    models = [build_model(model, num_classes=num_classes, in_channels=3).to(dev).train() for _ in range(peers)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
                  for m in models]
    state: dict = {}
    train_steps(models, optimizers, loader, warmup, state, dev)
    sync(dev)
    t0 = time.perf_counter()
    train_steps(models, optimizers, loader, steps, state, dev)
    sync(dev)
    seconds = time.perf_counter() - t0
    state.clear()  # shuts the worker processes down
    return {"images_per_s": batch_size * steps / seconds, "images_per_s_per_peer": batch_size * steps / seconds / peers,
            "step_ms": 1000.0 * seconds / steps, "device": str(dev), "peers": peers, "batch_size": batch_size, "workers": workers,
            "precision": "fp32", "channels_last": False, "steps": steps, "warmup": warmup,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores, at most 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    r = run_reference(a.steps, a.warmup, a.size, a.batch_size, a.peers, a.workers, device=a.device)
    print(json.dumps(r) if a.json else f"reference DML: {r['images_per_s']:.1f} images/s through the cohort "
          f"({r['step_ms']:.0f} ms/step, {a.peers} x resnet32, batch {a.batch_size}, {r['workers']} workers, "
          f"{r['device']})")


if __name__ == "__main__":
    main()
