"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the standard "python version" pickle folders.

``cifar-10-batches-py/`` holds ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta``; ``cifar-100-python/`` holds ``train``, ``test`` and ``meta``. Each batch is a
pickled dict with bytes keys: ``b'data'`` is a uint8 ``(N, 3072)`` array whose rows are the red,
green and blue 32x32 planes one after the other, and the labels are a list of ints.

Pickle can run arbitrary code, so the files are read with :class:`SafeUnpickler`, which only
builds numpy arrays; anything else in the stream is refused before it is called.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PeerdistillError
from ..fileio import find_dataset_dir
from .base import DATASETS, DatasetSplits, ImageSet

_SIDE = 32
_ROW = 3 * _SIDE * _SIDE


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 go through _codecs.encode(text, "latin1");
    # allow exactly that and no other codec.
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:  # object arrays would smuggle arbitrary Python objects in
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dt


def _allowed() -> dict[tuple[str, str], Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's private _reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # what protocol-5 pickles of arrays call
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _encode_latin1}
    # numpy < 2 pickles name ``numpy.core``, numpy >= 2 ``numpy._core``; the real CIFAR files were
    # written by Python 2 with numpy 1.x.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = _dtype
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays, lists, dicts, bytes and numbers, and nothing else."""

    _ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_pickle(path: Path) -> dict[str, Any]:
    """Safely read one CIFAR pickle into a dict with str keys; any failure is a one-line error."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes" keeps the Python 2 str payloads (array bytes, names) as bytes.
            obj = SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, forbidden class, garbage: all mean "bad file"
        raise PeerdistillError(f"cannot read CIFAR pickle {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise PeerdistillError(f"{path} is not a CIFAR pickle (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch(path: Path, label_key: str, num_classes: int) -> ImageSet:
    d = load_pickle(path)
    if "data" not in d or label_key not in d:
        raise PeerdistillError(f"{path} lacks the key 'data' or {label_key!r} "
                               f"(has {', '.join(sorted(d)) or 'no keys'})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PeerdistillError(f"{path}: 'data' must be uint8 (N, {_ROW}), got {desc}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise PeerdistillError(f"{path}: {label_key!r} is not a list of integers") from None
    if len(labels) != len(data):
        raise PeerdistillError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PeerdistillError(f"{path}: labels span {labels.min()}..{labels.max()}, "
                               f"expected 0..{num_classes - 1}")
    # Channel-major rows -> (N, 32, 32, 3), copied so the array owns contiguous memory.
    images = np.ascontiguousarray(data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))
    return ImageSet(images, labels)


def _names(path: Path, key: str, num_classes: int) -> list[str]:
    meta = load_pickle(path)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise PeerdistillError(f"{path}: {key!r} must list {num_classes} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _find(folder: str, markers: tuple[str, ...], root: str | None) -> Path:
    """Locate ``folder`` holding every file in ``markers``."""
    return find_dataset_dir(folder, root, lambda d: all((d / m).is_file() for m in markers),
                            "download and extract the python version from "
                            "https://www.cs.toronto.edu/~kriz/cifar.html into one of these")


def _cat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]))


# Per-channel training-set statistics, the constants used by the reference CIFAR codes.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@DATASETS.register("cifar10")
def cifar10(root: str | None = None) -> DatasetSplits:
    """CIFAR-10: 50k train / 10k test, 32x32 RGB, 10 classes.

    Args:
        root: ``cifar-10-batches-py/`` itself or the folder holding it; by default
            ``$PEERDISTILL_DATA``, ``./data`` and ``~/.cache/peerdistill`` are searched.
    """
    d = _find("cifar-10-batches-py", ("test_batch", "batches.meta"), root)
    classes = _names(d / "batches.meta", "label_names", 10)
    train_files = sorted(d.glob("data_batch_[0-9]*"), key=lambda p: p.name)
    if not train_files:
        raise PeerdistillError(f"{d} has no data_batch_1 .. data_batch_5 files")
    train = _cat([_batch(p, "labels", 10) for p in train_files])
    test = _batch(d / "test_batch", "labels", 10)
    mean, std = _CIFAR10_STATS
    return DatasetSplits(train, test, classes, mean=mean, std=std, crop_padding=4, flip=True,
                         meta={"path": str(d)}).check("cifar10")


@DATASETS.register("cifar100")
def cifar100(root: str | None = None) -> DatasetSplits:
    """CIFAR-100: 50k train / 10k test, 32x32 RGB, 100 fine classes (the coarse labels are unused).

    Args:
        root: ``cifar-100-python/`` itself or the folder holding it; by default
            ``$PEERDISTILL_DATA``, ``./data`` and ``~/.cache/peerdistill`` are searched.
    """
    d = _find("cifar-100-python", ("train", "test", "meta"), root)
    classes = _names(d / "meta", "fine_label_names", 100)
    train = _batch(d / "train", "fine_labels", 100)
    test = _batch(d / "test", "fine_labels", 100)
    mean, std = _CIFAR100_STATS
    return DatasetSplits(train, test, classes, mean=mean, std=std, crop_padding=4, flip=True,
                         meta={"path": str(d)}).check("cifar100")
