"""Fashion-MNIST (Xiao et al. 2017) from the four standard IDX files, gzipped or not.

Default location is Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import PeerdistillError
from .base import DATASETS, DatasetSplits, ImageSet

DEFAULT_ROOTS = ("/usr/share/datasets/fashion-mnist",)
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# Dtype codes of the IDX format (LeCun's MNIST page).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``); a truncated or malformed file is a one-line error."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PeerdistillError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise PeerdistillError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PeerdistillError(f"{path} is truncated (header incomplete)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise PeerdistillError(f"{path} is truncated or corrupt: {len(data) - header} data bytes, "
                               f"expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


@DATASETS.register("fashion_mnist", aliases=("fashion-mnist",))
def fashion_mnist(root: str | None = None) -> DatasetSplits:
    """Fashion-MNIST: 60k train / 10k test, 28x28 grey, 10 classes."""
    roots = [Path(root)] if root else [Path(p) for p in DEFAULT_ROOTS]
    if os.environ.get("PEERDISTILL_DATA"):
        roots.append(Path(os.environ["PEERDISTILL_DATA"]) / "fashion-mnist")
    for r in roots:
        paths = {k: find_idx(r, v) for k, v in FILES.items()}
        if all(paths.values()):
            arrays = {k: read_idx(p) for k, p in paths.items()}
            return DatasetSplits(
                train=ImageSet(arrays["train_images"].astype(np.uint8), arrays["train_labels"]),
                test=ImageSet(arrays["test_images"].astype(np.uint8), arrays["test_labels"]),
                classes=list(CLASSES),
                # Statistics of the 60k training images.
                mean=(0.2860,), std=(0.3530,), crop_padding=2, flip=True)
    raise PeerdistillError(
        f"Fashion-MNIST not found in {', '.join(map(str, roots))}; install it with "
        "`sudo apt-get install dataset-fashion-mnist` or set data.root to a folder holding the four "
        "IDX files (train-images-idx3-ubyte[.gz], ...)")
