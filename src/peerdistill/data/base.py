"""What a dataset source returns, and the registry of sources.

A source reads a dataset from disk once into uint8 arrays; everything after that (validation split,
device placement, batched augmentation) is shared. Sources never download anything at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..registry import Registry


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)`` and int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim == 3:  # grey images stored as (N, H, W)
            self.images = self.images[..., None]
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx])


@dataclass
class DatasetSplits:
    """A source's result: train and test sets plus what augmentation and models need to know."""

    train: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]  # per-channel, in [0, 1]
    std: tuple[float, ...]
    crop_padding: int = 4  # standard random-crop padding for this dataset
    flip: bool = True
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check(self, name: str) -> DatasetSplits:
        """Validate labels and shapes; raise a one-line error naming the dataset."""
        from ..errors import PeerdistillError

        for split, s in (("train", self.train), ("test", self.test)):
            if len(s) == 0:
                raise PeerdistillError(f"dataset {name!r}: the {split} split is empty")
            lo, hi = int(s.labels.min()), int(s.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise PeerdistillError(f"dataset {name!r}: {split} labels span {lo}..{hi} "
                                       f"but there are {self.num_classes} classes")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise PeerdistillError(f"dataset {name!r}: train images {self.train.images.shape[1:]} "
                                   f"and test images {self.test.images.shape[1:]} differ in shape")
        return self


DATASETS: Registry[DatasetSplits] = Registry("dataset")


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, H, W, C) images (computed in chunks)."""
    c = images.shape[-1]
    s = np.zeros(c)
    s2 = np.zeros(c)
    n = 0
    for i in range(0, len(images), 4096):
        chunk = images[i:i + 4096].reshape(-1, c).astype(np.float64) / 255.0
        s += chunk.sum(0)
        s2 += (chunk ** 2).sum(0)
        n += len(chunk)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
