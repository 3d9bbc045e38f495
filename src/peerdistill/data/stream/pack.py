"""Packing a class-per-folder image tree into webdataset shards (``peerdistill pack``).

Every image is decoded once while packing (a corrupt file is a one-line error naming it, found before a
training run meets it). With ``max_side`` every image whose shorter side exceeds it is re-encoded as a
JPEG of quality ``quality`` with its shorter side ``max_side`` (FFCV's ``max_resolution`` bounds the longer
side instead): a cluster reads fewer bytes and the training workers decode fewer pixels. Images already
small enough are stored byte for byte.

The samples are shuffled once (seeded) before they are cut into shards of ``shard_size``, so a sequential
webdataset reader sees mixed classes. The plan -- the source files (path, size, mtime, label), the
settings and the order -- is fixed before the first shard is written, and every shard is written to a
temporary file and renamed: an interrupted pack leaves only whole shards, and running the same command
again writes the missing ones. ``meta.json`` (classes, counts, settings) is written last; until then the
readers refuse the folder as unfinished.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import typing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from ...errors import PeerdistillError
from ...fileio import atomic_write
from ...params import Interval, NonNegativeInt, PositiveInt, check_value
from .codec import DecodeError, decode, image_size
from .protocol import eval_geometry
from .sets import FolderSet, class_folders, scan_folder
from .shards import META, PLAN

_FORMATS = {b"\xff\xd8": "jpg", b"\x89PNG": "png", b"BM": "bmp"}


@dataclass(frozen=True)
class PackOptions:
    """Settings of a pack.

    Attributes:
        shard_size: Samples per shard (the last shard may hold fewer).
        max_side: Bound on the shorter side; None keeps every image as it is.
        quality: JPEG quality of re-encoded images.
        seed: Seed of the order of the samples across shards.
    """

    shard_size: PositiveInt
    max_side: Annotated[int, Interval(ge=8)] | None = None
    quality: Annotated[int, Interval(ge=1, le=100)] = 90
    seed: NonNegativeInt = 0

    def check(self) -> None:
        """Raise a one-line error naming the first setting outside its declared range."""
        for name, hint in typing.get_type_hints(PackOptions, include_extras=True).items():
            check_value(getattr(self, name), hint, f"--{name.replace('_', '-')}")


def _extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _FORMATS.items() if data.startswith(magic)), "")


def bounded(data: bytes, max_side: int | None, quality: int) -> tuple[bytes, str]:
    """The bytes to store for one image and their extension; raises :class:`DecodeError` if it is not
    a decodable image."""
    size = image_size(data)
    ext = _extension(data)
    if max_side is None or min(size) <= max_side:
        decode(data)  # the check: every stored image decodes
        if not ext:
            raise DecodeError("not a JPEG, PNG, WebP or BMP file")
        return data, ext
    from PIL import Image

    new, _ = eval_geometry(size[0], size[1], max_side, 1.0)  # torchvision's Resize(max_side) sizes
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if im.mode in ("L", "LA", "I;16") else "RGB")
            # The filter of the evaluation resize (antialiased bilinear, torchvision's Resize): with
            # max_side = 256, evaluating from the shards is evaluating from the files plus one JPEG pass.
            small = im.resize(new, Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(str(e)) from None
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _key(relpath: str) -> str:
    """A webdataset key: the path without its extension, dots (which end keys) made underscores."""
    stem = relpath.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def _publish(path: Path, write: Callable) -> None:
    """Write ``path`` atomically, readable as any new file is (the temporary file was private)."""
    atomic_write(path, write)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeerdistillError(f"cannot read {path}: {e}") from None


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: the same pack, the same bytes
    tf.addfile(info, io.BytesIO(data))


def write_shard(files: FolderSet, path: Path, opts: PackOptions) -> int:
    """Write the samples of ``files`` (in order) to the shard ``path`` atomically; returns their count."""
    encoded = []
    keys: set[str] = set()
    for i in range(len(files)):
        try:
            data, ext = bounded(files.read(i), opts.max_side, opts.quality)
        except DecodeError as e:
            raise PeerdistillError(f"cannot decode image {files.describe(i)}: {e}") from None
        key = _key(files.relpath(i))
        key = key if key not in keys else f"{key}_{i}"
        keys.add(key)
        encoded.append((key, ext, data, int(files.labels[i])))

    def write(f) -> None:  # noqa: ANN001 - a binary file object
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for key, ext, data, label in encoded:
                _member(tf, f"{key}.{ext}", data)
                _member(tf, f"{key}.cls", str(label).encode())

    _publish(path, write)
    return len(encoded)


def _plan(files: FolderSet, opts: PackOptions) -> str:
    """An identifier of what this pack will write: source files, labels, classes and settings."""
    h = hashlib.sha1(json.dumps({"v": 1, **asdict(opts), "classes": files.classes}, sort_keys=True).encode())
    for i in range(len(files)):
        st = files.path(i).stat()
        h.update(f"|{files.relpath(i)}:{st.st_size}:{st.st_mtime_ns}:{files.labels[i]}".encode())
    return h.hexdigest()


def _claim(dst: Path, plan: str) -> bool:
    """Take ``dst`` for this plan; False if it already holds exactly this finished pack."""
    meta = dst / META
    if meta.is_file():
        if _read_json(meta).get("plan") == plan:
            return False
        raise PeerdistillError(f"{dst} already holds a pack of other files or settings; delete it or choose "
                               f"another destination")
    if (dst / PLAN).is_file():
        if _read_json(dst / PLAN).get("plan") != plan:
            raise PeerdistillError(f"{dst} holds an unfinished pack of other files or settings; delete it or "
                                   f"choose another destination")
    elif dst.is_dir() and any(dst.glob("*.tar")):
        raise PeerdistillError(f"{dst} already holds shards that this command did not write; choose an "
                               f"empty destination")
    atomic_write(dst / PLAN, lambda f: f.write(json.dumps({"plan": plan}).encode()))
    for stale in dst.glob("shard-*.tar.*.tmp"):  # temp files of a killed run: never renamed, never valid
        stale.unlink()
    return True


def pack_split(files: FolderSet, dst: Path, opts: PackOptions, workers: int = 1,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Pack one split into ``dst/shard-NNNNNN.tar`` + ``dst/meta.json``, resuming an interrupted pack.

    Returns:
        The pack's metadata (what ``meta.json`` holds).
    """
    opts.check()
    plan = _plan(files, opts)
    order = np.random.default_rng(opts.seed).permutation(len(files))
    parts = [order[k:k + opts.shard_size] for k in range(0, len(files), opts.shard_size)]
    names = [f"shard-{k:06d}.tar" for k in range(len(parts))]
    meta = {"format": "webdataset", "classes": files.classes, "samples": len(files), "shards": names,
            **asdict(opts), "plan": plan}
    if not _claim(dst, plan):
        return _read_json(dst / META)
    todo = [k for k, name in enumerate(names) if not (dst / name).is_file()]
    jobs = [FolderSet.from_paths(files.root, [files.relpath(i) for i in parts[k]], files.labels[parts[k]],
                                 files.classes) for k in todo]
    done = len(names) - len(todo)
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for _ in (pool.map if pool else map)(write_shard, jobs, [dst / names[k] for k in todo],
                                             [opts] * len(todo)):
            done += 1
            if progress:
                progress(done, len(names))
    _publish(dst / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    (dst / PLAN).unlink()
    return meta


def splits_of(src: Path) -> list[tuple[str, Path]]:
    """The splits to pack: ``train`` and ``val``/``test`` of a dataset folder, else ``src`` as one split."""
    if (src / "train").is_dir():
        return [(s, src / s) for s in ("train", "val", "test") if (src / s).is_dir()]
    return [("", src)]


def pack(src: str | Path, dst: str | Path, opts: PackOptions, workers: int = 1,
         progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Pack ``src`` into shards under ``dst``.

    ``src`` is a dataset folder (``train/<class>/`` and ``val/<class>/`` or ``test/<class>/``: each split
    goes to ``dst/<split>/``, all with the training split's classes) or one split's class folders (packed
    into ``dst`` itself).

    Returns:
        Each split's metadata, keyed by split name (``""`` for a single split).
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise PeerdistillError(f"{src} is not a folder")
    splits = splits_of(src)
    classes = class_folders(splits[0][1])
    out = {}
    for name, folder in splits:
        files = scan_folder(folder, classes, require_all=(folder == splits[0][1]))
        report = (lambda d, n, name=name: progress(name, d, n)) if progress else None
        out[name] = pack_split(files, dst / name if name else dst, opts, workers, report)
        out[name]["notes"] = files.notes
    return out
