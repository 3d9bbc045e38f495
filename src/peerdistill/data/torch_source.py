"""The user's own data as a source: any map-style torch ``Dataset`` (or a ``DataLoader``) read once into the
engine's uint8 arrays, so it goes through the same validation split, augmentation, mixing and views as every
built-in dataset (docs/api.md).

Register it as a source in a plugin module::

    @DATASETS.register("mydata")
    def mydata(root=None):
        return from_torch(MyDataset("train"), MyDataset("test"), classes=["cat", "dog"])

Items are ``(image, label)`` pairs (further fields are ignored). An image is a (C, H, W) tensor (uint8 as it
is; float in [0, 1], e.g. ``ToTensor()``'s, scaled to 0..255 and rounded, so 1/255 steps), a (H, W, C) or
(H, W) uint8 array, or a PIL image. Normalise nothing in the dataset: the engine normalises with the
training images' channel statistics (or the ``mean`` / ``std`` given).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import PeerdistillError
from .base import DatasetSplits, ImageSet, channel_stats


def _image(x: Any, where: str) -> np.ndarray:
    """One image as uint8 (H, W, C)."""
    if isinstance(x, Tensor):
        t = x.detach().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise PeerdistillError(f"{where}: an image tensor must be (C, H, W), got shape {tuple(t.shape)}")
        if t.is_floating_point():
            lo, hi = float(t.min()), float(t.max())
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise PeerdistillError(f"{where}: float images must lie in [0, 1] (unnormalised, as ToTensor() "
                                       f"gives), got values in [{lo:.3g}, {hi:.3g}]")
            t = (t * 255).round()
        elif t.dtype != torch.uint8:
            raise PeerdistillError(f"{where}: image tensors must be uint8 or float in [0, 1], got {t.dtype}")
        return t.to(torch.uint8).permute(1, 2, 0).numpy()
    a = np.asarray(x)  # numpy arrays and PIL images
    if a.dtype != np.uint8:
        raise PeerdistillError(f"{where}: image arrays must be uint8 (H, W[, C]), got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise PeerdistillError(f"{where}: an image array must be (H, W[, C]), got shape {a.shape}")
    return a


def _items(source: Any) -> Iterable[tuple[Any, Any]]:
    """(image, label) pairs of a map-style dataset, or of a DataLoader's batches row by row."""
    if isinstance(source, torch.utils.data.DataLoader):
        for batch in source:
            images, labels = batch[0], batch[1]
            yield from zip(images, labels)
        return
    if not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
        raise PeerdistillError(f"a data source must be a map-style torch Dataset (__getitem__ and __len__) or a "
                               f"DataLoader, got {type(source).__name__}")
    for i in range(len(source)):
        item = source[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise PeerdistillError(f"item {i} of {type(source).__name__} is not an (image, label) pair")
        yield item[0], item[1]


def image_set(source: Any, what: str = "dataset") -> ImageSet:
    """A torch Dataset or DataLoader read into an :class:`ImageSet` (uint8 NHWC, int64 labels)."""
    images, labels = [], []
    for k, (x, y) in enumerate(_items(source)):
        images.append(_image(x, f"{what} item {k}"))
        labels.append(int(y))
    if not images:
        raise PeerdistillError(f"the {what} is empty")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise PeerdistillError(f"the {what}'s images differ in shape ({', '.join(map(str, sorted(shapes)[:3]))}); "
                               f"resize them to one shape in the dataset")
    return ImageSet(np.stack(images), np.asarray(labels, np.int64))


def from_torch(train: Any, test: Any, classes: Sequence[str] | int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               crop_padding: int = 4, flip: bool = True) -> DatasetSplits:
    """The engine's :class:`DatasetSplits` from two torch Datasets (or DataLoaders) of the user's.

    Args:
        train, test: the training and test sets (the engine holds a validation split out of ``train``).
        classes: class names, or their number (default: 1 + the largest label).
        mean, std: per-channel normalisation in [0, 1] units (default: the training images' statistics).
        crop_padding, flip: the standard augmentation of this data (random crop padding, horizontal flips).
    """
    tr, te = image_set(train, "training set"), image_set(test, "test set")
    k = classes if isinstance(classes, int) else len(classes) if classes is not None else \
        int(max(tr.labels.max(), te.labels.max())) + 1
    names = list(classes) if isinstance(classes, Sequence) and not isinstance(classes, str) else \
        [f"class{i}" for i in range(k)]
    m, s = channel_stats(tr.images)
    return DatasetSplits(tr, te, names, tuple(mean) if mean is not None else m, tuple(std) if std is not None else s,
                         crop_padding, flip)
