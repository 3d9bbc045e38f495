"""Any dataset stored one folder per class, the layout torchvision's ``ImageFolder`` reads.

::

    root/train/<class>/**/*.{png,jpg,jpeg,bmp,webp}
    root/test/<class>/...      (or root/val/<class>/... when there is no test/)

Every image is resized to ``image_size`` x ``image_size`` and decoded once into a cached ``.npz``
(see :mod:`peerdistill.data.cache`), so later runs start in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np

from ..errors import PeerdistillError
from ..params import Interval
from .base import DATASETS, DatasetSplits, ImageSet, channel_stats
from .stream import scan_folder
from .streamed import IMAGENET_MEAN, IMAGENET_STD, StreamSplits, grey_stats, split_dirs
from .cache import IMAGE_EXTENSIONS, cached_arrays, decode_images, fingerprint, list_images


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split(split_dir: Path, classes: list[str], require_all: bool) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        found = list_images(split_dir / c) if (split_dir / c).is_dir() else []
        if require_all and not found:
            # A training class without images is almost certainly a mistake (torchvision agrees).
            raise PeerdistillError(f"class folder {split_dir / c} holds no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [i] * len(found)
    return files, labels


@DATASETS.register("imagefolder")
def imagefolder(root: str | None = None, image_size: Annotated[int, Interval(ge=8)] = 32,
                grayscale: bool = False, lazy: bool = False) -> DatasetSplits | StreamSplits:
    """A class-per-folder dataset with ``train/`` and ``test/`` (or ``val/``) subfolders.

    Args:
        root: The folder holding ``train/`` and ``test/`` (or ``val/``).
        image_size: In memory, every image is resized to this square size (aspect ratio not kept); streamed,
            the side of the ImageNet protocol's crops (the general ``data.image_size``).
        grayscale: Decode to one channel instead of RGB.
        lazy: List the files without decoding any (the engine streams them; ``data.stream``).

    Returns:
        In memory: splits whose classes are the sorted train class-folder names and whose mean/std are the
        per-channel statistics of the decoded training images. Lazy: the listings, with ImageNet's mean/std.
    """
    if lazy:
        return _lazy(root, image_size, grayscale)
    if not root:
        raise PeerdistillError("dataset 'imagefolder' needs data.root: a folder holding train/<class>/ "
                               "and test/<class>/ (or val/<class>/) image folders")
    d = Path(root).expanduser()
    train_dir = d / "train"
    test_dir = next((d / s for s in ("test", "val") if (d / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise PeerdistillError(f"image folder dataset not found: {d} must hold train/<class>/ and "
                               f"test/<class>/ (or val/<class>/) folders of images")
    classes = _class_dirs(train_dir)
    if not classes:
        raise PeerdistillError(f"{train_dir} has no class folders")
    extra = sorted(set(_class_dirs(test_dir)) - set(classes))
    if extra:
        raise PeerdistillError(f"{test_dir} has class folders missing from {train_dir}: "
                               f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    train_files, train_labels = _split(train_dir, classes, require_all=True)
    test_files, test_labels = _split(test_dir, classes, require_all=False)
    if not test_files:
        raise PeerdistillError(f"{test_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    mode = "gray" if grayscale else "rgb"
    channels = 1 if grayscale else 3
    # The class list is part of the fingerprint through the relative paths, so renaming a class
    # folder or changing image_size/grayscale invalidates the cache.
    fp = fingerprint(train_files + test_files, d, f"imagefolder|{image_size}|{mode}|{test_dir.name}")

    def build() -> dict[str, np.ndarray]:
        train_x = decode_images(train_files, image_size, grayscale)
        mean, std = channel_stats(train_x)  # stored in the cache: one pass over the pixels, once
        return {"train_x": train_x, "train_y": np.array(train_labels, np.int64),
                "test_x": decode_images(test_files, image_size, grayscale),
                "test_y": np.array(test_labels, np.int64),
                "mean": np.array(mean, np.float64), "std": np.array(std, np.float64)}

    def validate(a: dict[str, np.ndarray]) -> None:
        for split, n in (("train", len(train_files)), ("test", len(test_files))):
            x, y = a[f"{split}_x"], a[f"{split}_y"]
            if x.dtype != np.uint8 or x.shape != (n, image_size, image_size, channels) or y.shape != (n,):
                raise ValueError(f"{split} arrays are {x.dtype} {x.shape} / {y.shape}, expected {n} images")
            if y.min() < 0 or y.max() >= len(classes):
                raise ValueError(f"{split} labels out of range")
        if a["mean"].shape != (channels,) or a["std"].shape != (channels,):
            raise ValueError("mean/std have the wrong number of channels")

    a = cached_arrays(d, f"imagefolder-{image_size}-{mode}", fp, build, validate)
    # Random-crop padding of 1/8 of the side: 4 at 32x32, 8 at 64x64, the CIFAR/Tiny-ImageNet habit.
    return DatasetSplits(ImageSet(a["train_x"], a["train_y"]), ImageSet(a["test_x"], a["test_y"]),
                         classes, mean=tuple(float(v) for v in a["mean"]),
                         std=tuple(float(v) for v in a["std"]), crop_padding=max(1, image_size // 8),
                         flip=True, meta={"path": str(d), "test_split": test_dir.name}).check("imagefolder")


def _lazy(root: str | None, image_size: int, grayscale: bool) -> StreamSplits:
    train_dir, test_dir = split_dirs(root, "imagefolder")
    train = scan_folder(train_dir)
    test = scan_folder(test_dir, train.classes, require_all=False)
    channels = 1 if grayscale else 3
    mean, std = grey_stats(IMAGENET_MEAN, IMAGENET_STD, channels)
    return StreamSplits(train, test, train.classes, channels, image_size, mean, std,
                        meta={"path": str(train_dir.parent), "test_split": test_dir.name,
                              "notes": train.notes + test.notes})
