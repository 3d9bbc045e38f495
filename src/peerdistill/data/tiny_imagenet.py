"""Tiny-ImageNet (the CS231n 200-class ImageNet subset) from the standard ``tiny-imagenet-200/`` folder.

Layout: ``wnids.txt`` (the 200 WordNet ids), ``words.txt`` (wnid -> names), 500 training JPEGs per
class in ``train/<wnid>/images/`` and 10k validation JPEGs in ``val/images/`` labelled by
``val/val_annotations.txt``. The official test labels were never published, so -- as is usual for
Tiny-ImageNet results -- the labelled **val split is used as the test split**; the unlabelled
``test/`` folder is ignored.

The 110k JPEGs are decoded once with Pillow and cached as an uncompressed ``.npz`` (see
:mod:`peerdistill.data.cache`); later loads read the cache in about a second.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PeerdistillError
from ..fileio import find_dataset_dir
from .base import DATASETS, DatasetSplits, ImageSet
from .cache import cached_arrays, decode_images, fingerprint

FOLDER = "tiny-imagenet-200"
SIZE = 64
# ImageNet statistics rather than ones measured on this copy: Tiny-ImageNet is drawn from ImageNet,
# so they are close to its own (about (0.480, 0.448, 0.398) / (0.277, 0.269, 0.282)); fixed constants
# keep a run independent of which copy or subset is on disk and avoid a pass over 1.2 GB of pixels;
# and they are what many Tiny-ImageNet training codes normalise with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def find_root(root: str | None) -> Path:
    """``root`` may be ``tiny-imagenet-200/`` itself or its parent; else the default roots."""
    return find_dataset_dir(FOLDER, root, lambda d: (d / "wnids.txt").is_file() and (d / "train").is_dir(),
                            "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into one "
                            "of these")


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PeerdistillError(f"cannot read {path}: {e}") from None


def class_names(d: Path, wnids: list[str]) -> list[str]:
    """First synonym of each wnid from ``words.txt`` (e.g. ``goldfish``), else the wnid itself."""
    words: dict[str, str] = {}
    if (d / "words.txt").is_file():
        for ln in _read_lines(d / "words.txt"):
            wnid, _, text = ln.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    names = [words.get(w) or w for w in wnids]
    # A few WordNet synsets share a first synonym; keep names unique by adding the wnid.
    dup = {n for n in names if names.count(n) > 1}
    return [f"{n} ({w})" if n in dup else n for n, w in zip(names, wnids)]


def listing(d: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """Sorted wnids and the (file, label) lists of the train and val splits."""
    wnids = sorted(set(_read_lines(d / "wnids.txt")))  # sorted, like ImageFolder-based codes
    if not wnids:
        raise PeerdistillError(f"{d / 'wnids.txt'} lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    train_files: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        files = sorted((d / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise PeerdistillError(f"no training images in {d / 'train' / w / 'images'}")
        train_files += files
        train_labels += [index[w]] * len(files)
    ann = d / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise PeerdistillError(f"{ann} not found; the val split (used as the test split) needs it")
    val_files: list[Path] = []
    val_labels: list[int] = []
    for n, ln in enumerate(_read_lines(ann), 1):
        parts = ln.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise PeerdistillError(f"{ann} line {n}: expected '<file>\\t<wnid>\\t...' with a wnid "
                                   f"from wnids.txt, got {ln[:80]!r}")
        f = d / "val" / "images" / parts[0]
        if not f.is_file():
            raise PeerdistillError(f"{ann} line {n}: {f} does not exist")
        val_files.append(f)
        val_labels.append(index[parts[1]])
    return wnids, train_files, train_labels, val_files, val_labels


@DATASETS.register("tiny_imagenet", aliases=("tiny-imagenet",))
def tiny_imagenet(root: str | None = None) -> DatasetSplits:
    """Tiny-ImageNet: 100k train / 10k test (the official val split), 64x64 RGB, 200 classes.

    Args:
        root: ``tiny-imagenet-200/`` itself or the folder holding it; by default
            ``$PEERDISTILL_DATA``, ``./data`` and ``~/.cache/peerdistill`` are searched.
    """
    d = find_root(root)
    wnids, train_files, train_labels, val_files, val_labels = listing(d)
    fp = fingerprint([d / "wnids.txt", d / "val" / "val_annotations.txt", *train_files, *val_files],
                     d, f"tiny-imagenet|{SIZE}")

    def build() -> dict[str, np.ndarray]:
        return {"train_x": decode_images(train_files, SIZE), "train_y": np.array(train_labels, np.int64),
                "test_x": decode_images(val_files, SIZE), "test_y": np.array(val_labels, np.int64)}

    def validate(a: dict[str, np.ndarray]) -> None:
        for split, n in (("train", len(train_files)), ("test", len(val_files))):
            x, y = a[f"{split}_x"], a[f"{split}_y"]
            if x.dtype != np.uint8 or x.shape != (n, SIZE, SIZE, 3) or y.shape != (n,):
                raise ValueError(f"{split} arrays are {x.dtype} {x.shape} / {y.shape}, expected {n} images")
            if n and (y.min() < 0 or y.max() >= len(wnids)):
                raise ValueError(f"{split} labels out of range")

    a = cached_arrays(d, f"tiny-imagenet-{SIZE}", fp, build, validate)
    # crop_padding 8 at 64x64, as Good-DA does (RandomCrop(64, padding=8)); note that DKEL instead
    # uses Resize(64) + RandomCrop(64, padding=4).
    return DatasetSplits(ImageSet(a["train_x"], a["train_y"]), ImageSet(a["test_x"], a["test_y"]),
                         class_names(d, wnids), mean=MEAN, std=STD, crop_padding=8, flip=True,
                         meta={"path": str(d), "wnids": wnids, "test_split": "val"}).check("tiny_imagenet")
