"""Sharded tar archives in the webdataset layout, read with random access.

A shard is a plain tar file whose members are grouped into samples by key: ``<key>.jpg`` (or ``.jpeg``,
``.png``, ``.webp``, ``.bmp``) holds the encoded image and ``<key>.cls`` its class index as ASCII digits;
the key is the member's path up to the first dot of its file name (webdataset's rule) and other members
(``.json``, ``.txt``) are ignored. Clusters and object stores serve such files well, and every webdataset
tool reads them.

The reader does not stream the tar: a one-time pass over the headers records each image member's offset
and size (and reads the labels), and that index is cached beside the shards (``.peerdistill-shards-*.npz``,
or the per-user cache folder when the shards are read-only), keyed by the name, size and mtime of every
shard so a changed shard is re-indexed. Sample ``i`` is then one ``pread`` of known bytes: the epoch order
stays the sampler's global permutation and every crop stays seeded per sample, exactly as for files.
A missing label, a truncated shard or an unfinished pack is a one-line error naming the file. (An iterable
reader in shard order, which object stores without random access need, is not built.)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ...errors import PeerdistillError
from ..cache import cached_arrays
from .sets import IMAGE_EXTENSIONS, LazySet

INDEX_VERSION = 1
META = "meta.json"  # written last by `peerdistill pack`: classes, counts, settings
PLAN = ".pack-plan.json"  # present while a pack is unfinished
_IMAGE_EXT = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


def split_key(name: str) -> tuple[str, str]:
    """webdataset's key and extension of a member: ``a/b.c.d`` -> ``("a/b", "c.d")``."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def shard_files(path: str | Path) -> list[Path]:
    """The shards at ``path``: a folder (its ``*.tar``), one ``.tar`` file, or a glob pattern; sorted."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.tar"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p)) if f.endswith(".tar"))
    if not files:
        raise PeerdistillError(f"no shards (*.tar) at {p}")
    return files


def _index_shard(shard: Path, sid: int) -> list[tuple[int, int, int, int]]:
    """(shard id, data offset, size, label) of every sample of one shard, in member order."""
    size = shard.stat().st_size
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                key, ext = split_key(m.name)
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise PeerdistillError(f"shard {shard} is truncated: member {m.name} ends at byte "
                                           f"{m.offset_data + m.size}, the file has {size}")
                if ext in _IMAGE_EXT:
                    if key in images:
                        raise PeerdistillError(f"shard {shard}: sample {key!r} has two images "
                                               f"({images[key].name}, {m.name})")
                    images[key] = m
                elif ext == "cls":
                    labels[key] = _label(tf.extractfile(m).read(), shard, m.name)  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PeerdistillError(f"cannot read shard {shard}: {e}") from None
    orphans = sorted(labels.keys() - images.keys())
    if orphans:
        raise PeerdistillError(f"shard {shard}: sample {orphans[0]!r} has a label but no image "
                               f"({', '.join(sorted(_IMAGE_EXT))})")
    out = []
    for key, m in images.items():
        if key not in labels:
            raise PeerdistillError(f"shard {shard}: sample {key!r} ({m.name}) has no {key}.cls label")
        out.append((sid, m.offset_data, m.size, labels[key]))
    return out


def _label(raw: bytes, shard: Path, name: str) -> int:
    try:
        value = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise PeerdistillError(f"shard {shard}: {name} does not hold a class index ({raw[:20]!r})") from None
    if value < 0:
        raise PeerdistillError(f"shard {shard}: {name} holds a negative class index {value}")
    return value


def _fingerprint(shards: list[Path]) -> str:
    h = hashlib.sha1(f"shard-index-v{INDEX_VERSION}".encode())
    for s in shards:
        st = s.stat()
        h.update(f"|{s.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def build_index(shards: list[Path]) -> dict[str, np.ndarray]:
    """The member-offset index of ``shards``: arrays ``shard`` (int32), ``offset``, ``size``, ``label``."""
    rows = [r for sid, s in enumerate(shards) for r in _index_shard(s, sid)]
    if not rows:
        raise PeerdistillError(f"the shards at {shards[0].parent} hold no samples")
    a = np.array(rows, dtype=np.int64)
    return {"shard": a[:, 0].astype(np.int32), "offset": a[:, 1], "size": a[:, 2], "label": a[:, 3]}


class ShardSet(LazySet):
    """Samples of webdataset shards located by (shard, offset, size); see :func:`open_shards`."""

    def __init__(self, shards: list[Path], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 labels: np.ndarray, classes: list[str]) -> None:
        super().__init__(labels, classes)
        self.shards = [str(s) for s in shards]
        self._shard, self._offset, self._size = shard, offset, size

    def read(self, i: int) -> bytes:
        fd = os.open(self.shards[self._shard[i]], os.O_RDONLY)
        try:
            data = os.pread(fd, int(self._size[i]), int(self._offset[i]))
        finally:
            os.close(fd)
        if len(data) != self._size[i]:
            raise OSError(f"short read of {self.describe(i)} (the shard changed after it was indexed?)")
        return data

    def describe(self, i: int) -> str:
        shard, offset = self.shards[self._shard[i]], int(self._offset[i])
        try:
            with tarfile.open(shard, "r:") as tf:
                name = next((m.name for m in tf if m.offset_data == offset), f"offset {offset}")
        except (tarfile.TarError, OSError):
            name = f"offset {offset}"
        return f"{shard}:{name}"

    def subset(self, idx: np.ndarray) -> ShardSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ShardSet([Path(s) for s in self.shards], self._shard[idx], self._offset[idx], self._size[idx],
                        self.labels[idx], self.classes)


def read_meta(folder: Path) -> dict | None:
    """The pack's ``meta.json`` in ``folder``, None if absent; an unfinished pack is an error."""
    if (folder / PLAN).exists() and not (folder / META).exists():
        raise PeerdistillError(f"{folder} holds an unfinished pack (it was interrupted): run the same "
                               f"`peerdistill pack` command again to finish it")
    if not (folder / META).is_file():
        return None
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise PeerdistillError(f"cannot read {folder / META}: {e}") from None


def open_shards(path: str | Path, classes: list[str] | None = None) -> ShardSet:
    """Open webdataset shards for random access, indexing them once (cached beside them).

    Args:
        path: A folder of ``*.tar`` shards, one shard, or a glob pattern.
        classes: The class names; default: the pack's ``meta.json``, else ``"0" .. "K-1"`` for the
            largest label K - 1.

    Raises:
        PeerdistillError: no shards, an unfinished pack, a missing or malformed label, a truncated shard,
            or labels beyond the class list.
    """
    shards = shard_files(path)
    folder = shards[0].parent
    meta = read_meta(folder)
    if classes is None and meta is not None:
        classes = list(meta["classes"])
    tag = hashlib.sha1("|".join(s.name for s in shards).encode()).hexdigest()[:10]

    def validate(a: dict[str, np.ndarray]) -> None:
        n = len(a["label"])
        if any(len(a[k]) != n for k in ("shard", "offset", "size")) or a["shard"].max() >= len(shards):
            raise ValueError("inconsistent index arrays")

    a = cached_arrays(folder, f"shards-{tag}", _fingerprint(shards), lambda: build_index(shards), validate)
    labels = a["label"]
    classes = classes if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]
    if labels.max() >= len(classes):
        raise PeerdistillError(f"the shards at {folder} have labels up to {int(labels.max())} but there are "
                               f"{len(classes)} classes")
    return ShardSet(shards, a["shard"], a["offset"], a["size"], labels, classes)
