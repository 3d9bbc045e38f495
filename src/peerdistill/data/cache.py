"""Decode-once caching of image folders as uncompressed ``.npz`` files, and the image decoder.

Decoding ~100k JPEGs takes minutes; reading the same pixels back from one uncompressed ``.npz``
takes about a second. The cache lives next to the data (a hidden file) and falls back to
``$PEERDISTILL_CACHE`` or ``~/.cache/peerdistill/cache`` when the data folder is read-only.

A cache is only trusted if its fingerprint (format version, decode parameters and the path, size
and mtime of every source file) matches and the caller's validation (shapes, counts) passes;
anything else -- truncated file, stale listing, wrong shapes -- is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import PeerdistillError
from ..fileio import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the decoding changes, so old caches are rebuilt
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_FINGERPRINT_KEY = "__fingerprint__"

Arrays = dict[str, np.ndarray]


def fallback_cache_dir() -> Path:
    """Where caches go when the data folder is not writable."""
    env = os.environ.get("PEERDISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "peerdistill" / "cache"


def fingerprint(files: Sequence[Path], base: Path, params: str) -> str:
    """Hash of the decode parameters and every file's relative path, size and mtime."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{params}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.relative_to(base).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_paths(data_dir: Path, name: str) -> list[Path]:
    """Candidate cache files, preferred first: next to the data, then the per-user cache folder."""
    data_dir = data_dir.resolve()
    tag = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return [data_dir / f".peerdistill-{name}.npz", fallback_cache_dir() / f"{name}-{tag}.npz"]


def _load(path: Path, fp: str, validate: Callable[[Arrays], None]) -> Arrays:
    # allow_pickle=False: a cache file must never be able to run code.
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if str(arrays.pop(_FINGERPRINT_KEY, "")) != fp:
        raise ValueError("stale (the source files or decode settings changed)")
    validate(arrays)
    return arrays


def _save(path: Path, arrays: Arrays, fp: str) -> None:
    """Write atomically: a crash mid-write leaves the old cache (or none), never half a file."""
    atomic_write(path, lambda f: np.savez(f, **arrays, **{_FINGERPRINT_KEY: np.array(fp)}))


def cached_arrays(data_dir: Path, name: str, fp: str, build: Callable[[], Arrays],
                  validate: Callable[[Arrays], None]) -> Arrays:
    """Return the arrays cached for ``data_dir``, building and caching them if needed.

    Args:
        data_dir: The dataset folder; the cache is keyed by its absolute path.
        name: Cache file stem; include every decode parameter (e.g. ``imagefolder-32-rgb``).
        fp: Fingerprint of the source files (see :func:`fingerprint`).
        build: Decodes the dataset; called only on a cache miss.
        validate: Raises (any exception) if loaded arrays are inconsistent with the source listing.

    Returns:
        The arrays ``build`` returned, possibly read back from the cache.
    """
    candidates = cache_paths(data_dir, name)
    for path in candidates:
        if not path.exists():
            continue
        try:
            return _load(path, fp, validate)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, PeerdistillError) as e:
            warnings.warn(f"ignoring cache {path}: {e}; rebuilding it", stacklevel=2)
    log.info("decoding %s once into a cache (later runs will be fast)", data_dir)
    arrays = build()
    validate(arrays)
    for path in candidates:
        try:
            _save(path, arrays, fp)
            break
        except OSError as e:  # read-only data folder: try the per-user cache folder next
            log.info("cannot write cache %s: %s", path, e)
    else:
        warnings.warn(f"could not write a cache for {data_dir} in any of "
                      f"{', '.join(map(str, candidates))}; it will be decoded again next time",
                      stacklevel=2)
    return arrays


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files skipped), in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                  and p.is_file())


def decode_images(files: Sequence[Path], size: int, grayscale: bool = False) -> np.ndarray:
    """Decode ``files`` into uint8 ``(N, size, size, C)``, resizing to a square where needed.

    Args:
        files: Image paths.
        size: Output height and width; other sizes are resized (bilinear, antialiased by Pillow,
            aspect ratio not kept -- the same as ``Resize((size, size))`` in the reference codes).
        grayscale: Decode to one channel instead of RGB.

    Raises:
        PeerdistillError: naming the first file Pillow cannot read.
    """
    from PIL import Image  # imported lazily: only the image-folder sources need Pillow

    mode = "L" if grayscale else "RGB"
    out = np.empty((len(files), size, size, 1 if grayscale else 3), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            with Image.open(files[i]) as im:
                im.draft(mode, (size, size))  # JPEG: let libjpeg decode big photos at reduced scale
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8).reshape(size, size, -1)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad files
            raise PeerdistillError(f"cannot decode image {files[i]}: {e}") from None

    # Pillow releases the GIL while decoding, so threads give a near-linear speed-up.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(one, range(len(files))):
            pass
    return out
