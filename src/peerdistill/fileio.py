"""Small file helpers shared across the package: atomic writes and dataset-folder search."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import PeerdistillError


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temp file in the same folder, fsync, then rename: a crash never leaves half a file.

    The file gets the mode any new file gets (``0o666`` less the umask) or keeps the one it had: the temp
    file's private ``0o600`` must not survive the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def current_umask() -> int:
    """The process's umask: from ``/proc`` on Linux, else by setting it and putting it back (which another
    thread creating a file in between would see)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def default_data_roots() -> list[Path]:
    """Where datasets are looked for when ``data.root`` is not given."""
    return [Path(p).expanduser() for p in (os.environ.get("PEERDISTILL_DATA", ""), "./data",
                                            "~/.cache/peerdistill") if p]


def find_dataset_dir(folder: str, root: str | None, is_dataset: Callable[[Path], bool], how: str) -> Path:
    """Locate a dataset's ``folder``: ``root`` may be the folder itself or its parent, else the default
    roots. A miss is a one-line error listing every place looked at, followed by ``how`` to get it."""
    bases = [Path(root).expanduser()] if root else default_data_roots()
    looked = []
    for base in bases:
        for cand in (base, base / folder):
            looked.append(str(cand))
            if is_dataset(cand):
                return cand
    raise PeerdistillError(f"{folder}/ not found (looked in {', '.join(looked)}); {how}, or set data.root "
                           f"(or $PEERDISTILL_DATA) to the folder holding {folder}/")
