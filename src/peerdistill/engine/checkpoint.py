"""Atomic checkpoint writes and safe reads."""
from __future__ import annotations

import shutil
import zipfile
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


def resolve_checkpoint(path: str | Path, prefer: str = "last.pt") -> Path:
    """Accept a checkpoint file or a run directory (its ``checkpoints/<prefer>``)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / prefer, p / prefer, p / "checkpoints" / "last.pt"):
            if cand.is_file():
                return cand
        raise PeerdistillError(f"no checkpoint in {p} (looked for checkpoints/{prefer})")
    if not p.is_file():
        raise PeerdistillError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(path: str | Path, prefer: str = "last.pt") -> dict[str, Any]:
    """Load with ``weights_only=True``; a corrupt or foreign file is a one-line error."""
    p = resolve_checkpoint(path, prefer)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        reason = ("the file is truncated or corrupt" if not zipfile.is_zipfile(p)
                  else " ".join(str(e).split()).split(". ")[0][:160])
        other = {"last.pt": "best.pt", "best.pt": "last.pt"}.get(p.name)
        hint = (f"; the run's {other} may still be readable (--checkpoint {other})"
                if other and (p.parent / other).is_file() else "")
        raise PeerdistillError(f"cannot read checkpoint {p}: {reason}{hint}") from None
    if not isinstance(ckpt, dict) or "cohort" not in ckpt or "config" not in ckpt:
        raise PeerdistillError(f"{p} is not a peerdistill checkpoint")
    return ckpt
