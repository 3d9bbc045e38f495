"""Lazy image sets: labels in memory, pixels read on demand by sample index.

A lazy set holds what the samplers, the validation split and the class hold-out need (``labels``,
``classes``, ``subset``) and reads one sample's encoded bytes by index. Its memory is a few numpy arrays
(no Python object per sample), so a forked worker shares it without copying and a 1.28 M-image ImageNet
listing costs tens of MB, not gigabytes.

The class-per-folder layout (ImageNet's ``train/`` and ``val/``) is read by :func:`scan_folder`:

- classes are the sorted names of the split's sub-folders (or the list given, e.g. a training split's);
- images are files with an image extension, found recursively and sorted; hidden files are ignored;
- other files (``README.txt``, ``labels.csv``) are skipped and counted: :attr:`FolderSet.notes` holds one
  line naming how many and the first one;
- an empty class folder is an error naming it when ``require_all`` (training), and allowed otherwise
  (an evaluation split may lack a class).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import PeerdistillError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class LazySet:
    """Base of the lazy sets: ``labels`` (N,) int64 and ``classes``; subclasses read the bytes."""

    def __init__(self, labels: np.ndarray, classes: list[str]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i``."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where sample ``i`` lives, for error messages (a path, or ``shard.tar:key``)."""
        raise NotImplementedError

    def subset(self, idx: np.ndarray) -> LazySet:
        """The samples ``idx``, in that order (a validation split, a training subset)."""
        raise NotImplementedError

    def with_labels(self, labels: np.ndarray, classes: list[str] | None = None) -> LazySet:
        """The same samples with other labels (and class names), e.g. renumbered after a hold-out."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != self.labels.shape:
            raise ValueError(f"{len(labels)} labels for {len(self)} samples")
        out = self.subset(np.arange(len(self)))
        out.labels, out.classes = labels, self.classes if classes is None else list(classes)
        return out


class FolderSet(LazySet):
    """Image files under ``root``, stored as one byte string of relative paths plus offsets."""

    def __init__(self, root: Path, paths: bytes | np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 labels: np.ndarray, classes: list[str]) -> None:
        super().__init__(labels, classes)
        self.root = Path(root)
        self._root_bytes = os.fsencode(self.root)
        self._paths = np.frombuffer(paths, np.uint8) if isinstance(paths, bytes) else paths
        self._starts, self._ends = starts, ends

    @classmethod
    def from_paths(cls, root: str | Path, relpaths: list[str], labels: np.ndarray | list[int],
                   classes: list[str]) -> FolderSet:
        """A set of the given files (paths relative to ``root``) and labels."""
        encoded = [p.encode() for p in relpaths]
        lengths = np.array([len(p) for p in encoded], dtype=np.int64)
        ends = np.cumsum(lengths)
        return cls(Path(root), b"".join(encoded), ends - lengths, ends, np.asarray(labels, np.int64), classes)

    def relpath(self, i: int) -> str:
        """Sample ``i``'s path relative to ``root`` (``<class>/<file>``)."""
        return self._paths[self._starts[i]:self._ends[i]].tobytes().decode()

    def path(self, i: int) -> Path:
        return self.root / self.relpath(i)

    def read(self, i: int) -> bytes:
        # A bytes path and an unbuffered read: a third of pathlib + buffered I/O's cost per small file.
        with open(self._root_bytes + b"/" + self._paths[self._starts[i]:self._ends[i]].tobytes(), "rb",
                  buffering=0) as f:
            return f.readall()

    def describe(self, i: int) -> str:
        return str(self.path(i))

    def subset(self, idx: np.ndarray) -> FolderSet:
        idx = np.asarray(idx, dtype=np.int64)
        return FolderSet(self.root, self._paths, self._starts[idx], self._ends[idx], self.labels[idx],
                         self.classes)


def class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the visible sub-folders of ``split_dir``."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """(images, other files) under ``folder``, as paths relative to it, sorted; hidden entries skipped."""
    images, other = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if name.startswith("."):
                continue
            path = name if rel == "." else f"{rel}/{name}"
            (images if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else other).append(path)
    return sorted(images), sorted(other)


def scan_folder(split_dir: str | Path, classes: list[str] | None = None, require_all: bool = True) -> FolderSet:
    """List a class-per-folder split (``split_dir/<class>/**/<image>``) without opening any image.

    Args:
        split_dir: The split's folder (e.g. ``imagenet/train``).
        classes: The class list (e.g. the training split's, for ``val/``); default: the sorted sub-folder
            names. A sub-folder not in the list is an error naming it.
        require_all: Every class folder must hold at least one image (training splits).

    Raises:
        PeerdistillError: missing folder, no classes, an unknown class folder, or an empty one.
    """
    d = Path(split_dir).expanduser()
    if not d.is_dir():
        raise PeerdistillError(f"{d} is not a folder of class folders")
    found = class_folders(d)
    classes = found if classes is None else list(classes)
    if not classes:
        raise PeerdistillError(f"{d} has no class folders")
    extra = sorted(set(found) - set(classes))
    if extra:
        raise PeerdistillError(f"{d} has class folders that are not among the {len(classes)} classes: "
                               f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    relpaths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, c in enumerate(classes):
        images, other = _walk(d / c) if (d / c).is_dir() else ([], [])
        skipped += [f"{c}/{p}" for p in other]
        if require_all and not images:
            raise PeerdistillError(f"class folder {d / c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        relpaths += [f"{c}/{p}" for p in images]
        labels += [label] * len(images)
    if not labels:
        raise PeerdistillError(f"{d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out = FolderSet.from_paths(d, relpaths, labels, classes)
    if skipped:
        out.notes.append(f"skipped {len(skipped)} file(s) under {d} that are not images "
                         f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {d / skipped[0]}")
    return out
