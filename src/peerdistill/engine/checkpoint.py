"""Atomic checkpoint writes and safe reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import PeerdistillError
from ..fileio import atomic_write


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temp file and a rename: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


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
        raise PeerdistillError(f"cannot read checkpoint {p}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "cohort" not in ckpt or "config" not in ckpt:
        raise PeerdistillError(f"{p} is not a peerdistill checkpoint")
    return ckpt
