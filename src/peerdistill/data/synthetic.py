"""A deterministic, learnable, class-conditional image source for tests and benchmarks."""
from __future__ import annotations

from typing import Annotated

import numpy as np

from ..params import Interval, NonNegativeInt, PositiveInt
from .base import DATASETS, DatasetSplits, ImageSet


def _make(n: int, num_classes: int, image_size: int, channels: int, rng: np.random.Generator,
          prototypes: np.ndarray) -> ImageSet:
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    noise = rng.normal(0.0, 40.0, size=(n, image_size, image_size, channels))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return ImageSet(images, labels)


@DATASETS.register("synthetic")
def synthetic(root: str | None = None, size: PositiveInt = 512, num_classes: Annotated[int, Interval(ge=2)] = 10,
              image_size: Annotated[int, Interval(ge=8)] = 32, channels: PositiveInt = 3, test_size: PositiveInt = 256,
              seed: NonNegativeInt = 0) -> DatasetSplits:
    """Each class is a fixed random smooth prototype image plus Gaussian pixel noise.

    The same ``seed`` always gives the same data; a small CNN learns it in a few epochs.

    Args:
        root: unused (the data is generated).
        size: training images.
        num_classes: classes.
        image_size: side of the square images.
        channels: image channels.
        test_size: test images.
        seed: seed of the prototypes and the noise.
    """
    del root
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, channels))
    reps = -(-image_size // 4)
    prototypes = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :image_size, :image_size]
    train = _make(size, num_classes, image_size, channels, rng, prototypes)
    test = _make(test_size, num_classes, image_size, channels, rng, prototypes)
    return DatasetSplits(train, test, [f"class{i}" for i in range(num_classes)],
                         mean=(0.5,) * channels, std=(0.25,) * channels, crop_padding=2)
