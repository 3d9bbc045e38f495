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
from .samplers import Sampler


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
        self.host_labels = np.asarray(data.labels)  # for set-up work on the host: no read back from the device

    def __len__(self) -> int:
        return len(self.labels)


class DeviceLoader:
    """Yields batches of a :class:`DeviceSet`.

    Args:
        data: the device-resident set.
        batch_size: per-process batch size (samples; a pair sampler yields two rows per sample).
        shuffle: training order from ``sampler`` (seeded from ``seed`` and the epoch; the last
            incomplete batch is dropped), else every sample in order (evaluation).
        seed: base seed of the order.
        rank, world_size: shard each epoch across processes (DDP): rank r takes the columns ``r::world``
            of every global batch, so every rank gets the same number of batches.
        sampler: batch composition (:mod:`peerdistill.data.samplers`); random by default.
    """

    def __init__(self, data: DeviceSet, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, sampler: Sampler | None = None) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampler = sampler or Sampler()
        self.epoch = 0
        if shuffle:
            self._labels = data.host_labels
            self.sampler.check(self._labels, batch_size * world_size, world_size)
        self._n_batches = (len(self.sampler.epoch(self._labels, batch_size * world_size, world_size, seed, 0))
                           if shuffle else -(-len(data) // batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._n_batches

    def __iter__(self) -> Iterator[Batch]:
        if not self.shuffle:
            for b in range(len(self)):
                idx = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(self.data)),
                                   device=self.data.labels.device)
                yield Batch(self.data.images[idx], self.data.labels[idx], idx)
            return
        order = self.sampler.epoch(self._labels, self.batch_size * self.world_size, self.world_size,
                                   self.seed, self.epoch)[:, self.rank::self.world_size]
        order = order.to(self.data.labels.device)
        for idx in order:
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
