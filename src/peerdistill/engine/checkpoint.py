"""Atomic checkpoint writes and safe reads."""
from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import PeerdistillError
from ..fileio import atomic_write


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temp file and a rename: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_failure(e: BaseException, path: Path, state: Any = None) -> str:
    """Why a write failed, in a few words: the OS's reason, or "no space left on device" when torch's
    serializer fails without one and the disk cannot hold the file."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    need = sum(t.numel() * t.element_size() for t in _tensors(state))
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < need + (1 << 20):
        return f"no space left on device: {free / 2**20:.1f} MB free, about {need / 2**20:.1f} MB needed"
    return " ".join(str(e).split())[:160]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def resolve_checkpoint(path: str | Path, name: str | None = None, prefer: str = "last.pt") -> Path:
    """Accept a checkpoint file or a run directory.

    Args:
        path: a checkpoint file, or a run directory.
        name: the checkpoint of the run directory the user named (``checkpoints/<name>``, or ``<name>`` in the
            directory); one that does not exist is an error, never replaced by another.
        prefer: without ``name``: the run's ``checkpoints/<prefer>``, else its ``last.pt``.
    """
    p = Path(path)
    if p.is_dir():
        wanted = (name,) if name is not None else (prefer, "last.pt")
        for cand in (c for w in wanted for c in (p / "checkpoints" / w, p / w)):
            if cand.is_file():
                return cand
        have = sorted(f.name for f in (p / "checkpoints").glob("*.pt")) if (p / "checkpoints").is_dir() else []
        raise PeerdistillError(f"no checkpoint {' or '.join(dict.fromkeys(wanted))} in {p} "
                               f"(it holds {', '.join(have) or 'no checkpoint'})")
    if name is not None:
        raise PeerdistillError(f"--checkpoint {name} names a checkpoint of a run directory, but {p} is not a directory")
    if not p.is_file():
        raise PeerdistillError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(path: str | Path, prefer: str = "last.pt",
                    use_other: Callable[[Path], str] | None = None) -> dict[str, Any]:
    """Load with ``weights_only=True``; a corrupt or foreign file is a one-line error.

    Args:
        path: a checkpoint file or a run directory (its ``checkpoints/<prefer>``, else ``last.pt``).
        prefer: see :func:`resolve_checkpoint`.
        use_other: when the file is unreadable but the run's other checkpoint exists, says how the command
            at hand can use that one (e.g. ``lambda other: f"--checkpoint {other.name}"``).
    """
    p = resolve_checkpoint(path, prefer=prefer)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        reason = ("the file is truncated or corrupt" if not zipfile.is_zipfile(p)
                  else " ".join(str(e).split()).split(". ")[0][:160])
        raise PeerdistillError(f"cannot read checkpoint {p}: {reason}{_other_hint(p, use_other)}") from None
    if not isinstance(ckpt, dict) or "cohort" not in ckpt or "config" not in ckpt:
        raise PeerdistillError(f"{p} is not a peerdistill checkpoint")
    return ckpt


def _other_hint(p: Path, use_other: Callable[[Path], str] | None) -> str:
    other = {"last.pt": "best.pt", "best.pt": "last.pt"}.get(p.name)
    if other is None or not (p.parent / other).is_file():
        return ""
    how = f" ({use_other(p.parent / other)})" if use_other is not None else ""
    return f"; the run's {other} may still be readable{how}"
