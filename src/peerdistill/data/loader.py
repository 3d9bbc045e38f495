"""Device-resident data: uint8 images live on the training device; batches are index slices.

No worker processes, no per-image Python: a batch is ``images[idx]`` and augmentation is a few tensor
ops on the whole batch (DESIGN §4). Every random draw comes from a generator seeded from
``(seed, epoch)``, so an epoch is reproducible on its own and ``--resume`` replays it exactly.
"""
from __future__ import annotations

import math
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
    """One mini-batch: uint8 images (B, C, H, W), labels (B,), dataset indices (B,).

    Streamed batches also carry ``views``: uint8 (B, V, C, H, W), V independent host crops of each image
    (``images`` is the first); the trainer hands them out one per augmentation of ``images``.
    """

    images: Tensor
    labels: Tensor
    index: Tensor
    views: Tensor | None = None


class DeviceSet:
    """An :class:`ImageSet` moved to ``device`` as uint8 NCHW (channels_last storage)."""

    def __init__(self, data: ImageSet, device: torch.device | str) -> None:
        # NHWC numpy -> NCHW view of NHWC storage: exactly torch's channels_last layout.
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.host_labels = np.asarray(data.labels)  # for set-up work on the host: no read back from the device

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def loader(self, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
               sampler: Sampler | None = None, views: int = 1) -> DeviceLoader:
        """A :class:`DeviceLoader` of this set (``views``: unused, the device augments each view)."""
        return DeviceLoader(self, batch_size, shuffle, seed, rank, world_size, sampler)


class DeviceLoader:
    """Yields batches of a :class:`DeviceSet`.

    Args:
        data: the device-resident set.
        batch_size: per-process batch size (samples; a pair sampler yields two rows per sample).
        shuffle: training order from ``sampler`` (seeded from ``seed`` and the epoch; the last
            incomplete batch is dropped), else every sample in order (evaluation).
        seed: base seed of the order.
        rank, world_size: shard each epoch across processes (DDP): rank r takes the columns ``r::world``
            of every global batch, so every rank gets the same number of batches. Evaluation
            (``shuffle=False``): rank r takes its contiguous share of the samples.
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
        self._share = np.array_split(np.arange(len(data)), world_size)[rank]  # evaluation: this rank's samples
        self._n_batches = (len(self.sampler.epoch(self._labels, batch_size * world_size, world_size, seed, 0))
                           if shuffle else -(-len(self._share) // batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._n_batches

    def __iter__(self) -> Iterator[Batch]:
        if not self.shuffle:
            lo, n = (int(self._share[0]) if len(self._share) else 0), len(self._share)
            for b in range(len(self)):
                idx = torch.arange(lo + b * self.batch_size, lo + min((b + 1) * self.batch_size, n),
                                   device=self.data.labels.device)
                yield Batch(self.data.images[idx], self.data.labels[idx], idx)
            return
        order = self.sampler.epoch(self._labels, self.batch_size * self.world_size, self.world_size,
                                   self.seed, self.epoch)[:, self.rank::self.world_size]
        order = order.to(self.data.labels.device)
        for idx in order:
            yield Batch(self.data.images[idx], self.data.labels[idx], idx)


def class_shares(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` split over classes in proportion to their ``counts``, summing to exactly ``total``: each
    class gets the floor of its share, and the remainder goes one by one to the largest fractional parts
    (ties to the lower class). Integer arithmetic, so equal classes always tie."""
    counts = np.asarray(counts, np.int64)
    share, rest = np.divmod(counts * total, counts.sum())
    order = np.lexsort((np.arange(len(counts)), -rest))  # largest remainder first, then the lower class
    share[order[:total - int(share.sum())]] += 1
    return share


def _draw(labels: np.ndarray, per_class: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class (in label order), a seeded shuffle of its indices: the first ``per_class[c]`` are drawn.
    Returns the drawn indices and the others, each sorted."""
    rng = np.random.default_rng(seed)
    drawn = []
    for c, k in zip(np.unique(labels), per_class):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        drawn.append(idx[:k])
    picked = np.sort(np.concatenate(drawn)) if drawn else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[picked] = False
    return picked, np.flatnonzero(mask)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val), seeded: val holds ``round(fraction x N)`` samples (halves round up),
    each class its proportional share (:func:`class_shares`)."""
    if not 0.0 <= fraction < 1.0:
        raise PeerdistillError(f"data.val_split must be in [0, 1), got {fraction}")
    counts = np.unique(labels, return_counts=True)[1]
    val, train = _draw(labels, class_shares(counts, math.floor(fraction * len(labels) + 0.5)), seed)
    return train, val


def stratified_subset(labels: np.ndarray, n: int, seed: int, classes: list[str], what: str) -> np.ndarray:
    """Exactly ``n`` indices, seeded, each class its proportional share (:func:`class_shares`); a number that
    cannot be honoured (more than there are, or a class left without an image) is a one-line error."""
    present, counts = np.unique(labels, return_counts=True)
    if n > len(labels):
        raise PeerdistillError(f"{what} asks for more images than the {len(labels)} of the training set")
    shares = class_shares(counts, n)
    if (shares == 0).any():
        name = classes[int(present[np.argmax(shares == 0)])]
        raise PeerdistillError(f"{what} gives class {name!r} no image (each class gets its share of the {n}, in "
                               f"proportion to its size); use a larger subset")
    # The kept images are the last ones of each class's shuffle, as they always were: wherever the former
    # per-class rounding already gave these counts, the subset is the same images.
    return _draw(labels, counts - shares, seed)[1]


@dataclass
class DataBundle:
    """Train / validation / test sets on the device, plus the dataset facts augmentation needs."""

    train: DeviceSet
    val: DeviceSet | None
    test: DeviceSet
    splits: DatasetSplits


def train_val_indices(labels: np.ndarray, classes: list[str], val_split: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The stratified, seeded (train, validation) indices of a training set, or a one-line error when the
    split leaves a class without a training image; in-memory and streamed data share them."""
    tr_idx, val_idx = stratified_split(labels, val_split, seed)
    missing = np.setdiff1d(np.unique(labels), labels[tr_idx])
    if len(missing):
        raise PeerdistillError(f"data.val_split={val_split:g} of the {len(labels)} training images leaves class "
                               f"{classes[int(missing[0])]!r} without a training image; use more images "
                               f"(data.train_subset) or a smaller data.val_split")
    return tr_idx, val_idx


def split_to_device(splits: DatasetSplits, val_split: float, seed: int, device: torch.device | str) -> DataBundle:
    """Carve a stratified, seeded validation split from the training set and move all to ``device``."""
    tr_idx, val_idx = train_val_indices(splits.train.labels, splits.classes, val_split, seed)
    val = DeviceSet(splits.train.subset(val_idx), device) if len(val_idx) else None
    return DataBundle(DeviceSet(splits.train.subset(tr_idx), device), val, DeviceSet(splits.test, device), splits)
