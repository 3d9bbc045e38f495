"""Device-resident data: uint8 images live on the training device; batches are index slices.

No worker processes, no per-image Python: a batch is ``images[idx]`` and augmentation is a few tensor
ops on the whole batch (DESIGN §4). Every random draw comes from a generator seeded from
``(seed, epoch)``, so an epoch is reproducible on its own and ``--resume`` replays it exactly.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import PeerdistillError
from .base import DatasetSplits, ImageSet


@dataclass
class Batch:
    """One mini-batch: uint8 images (B, C, H, W), labels (B,), dataset indices (B,)."""

    images: Tensor
    labels: Tensor
    index: Tensor


class DeviceSet:
    """An :class:`ImageSet` moved to ``device`` as uint8 NCHW (channels_last storage)."""

    def __init__(self, data: ImageSet, device: torch.device | str) -> None:
        # NHWC numpy -> NCHW view of NHWC storage: exactly torch's channels_last layout.
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels).to(device)

    def __len__(self) -> int:
        return len(self.labels)


class DeviceLoader:
    """Yields shuffled (or ordered) batches of a :class:`DeviceSet`.

    Args:
        data: the device-resident set.
        batch_size: per-process batch size.
        shuffle: draw a new permutation each epoch (seeded from ``seed`` and the epoch).
        drop_last: drop the last incomplete batch (training) or keep it (evaluation).
        seed: base seed of the permutation.
        rank, world_size: shard each epoch's permutation across processes (DDP); every rank gets
            the same number of batches.
    """

    def __init__(self, data: DeviceSet, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        per_rank = len(data) // world_size if drop_last else -(-len(data) // world_size)
        if drop_last and per_rank < batch_size:
            raise PeerdistillError(f"batch_size {batch_size} is larger than the {per_rank} training "
                                   f"samples per process")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Tensor:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            usable = n - n % self.world_size if self.drop_last else n
            order = order[:usable][self.rank::self.world_size]
        return order.to(self.data.labels.device)

    def __len__(self) -> int:
        n = len(self.data) // self.world_size if self.drop_last else -(-len(self.data) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield Batch(self.data.images[idx], self.data.labels[idx], idx)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val) with ``fraction`` of every class in val, seeded."""
    if not 0.0 <= fraction < 1.0:
        raise PeerdistillError(f"data.val_split must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        val.append(idx[:int(round(len(idx) * fraction))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


@dataclass
class DataBundle:
    """Train / validation / test sets on the device, plus the dataset facts augmentation needs."""

    train: DeviceSet
    val: DeviceSet | None
    test: DeviceSet
    splits: DatasetSplits


def to_device(splits: DatasetSplits, val_split: float, seed: int, device: torch.device | str) -> DataBundle:
    """Carve a stratified, seeded validation split from the training set and move all to ``device``."""
    tr_idx, val_idx = stratified_split(splits.train.labels, val_split, seed)
    val = DeviceSet(splits.train.subset(val_idx), device) if len(val_idx) else None
    return DataBundle(DeviceSet(splits.train.subset(tr_idx), device), val, DeviceSet(splits.test, device), splits)
