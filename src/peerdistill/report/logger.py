"""What a run leaves behind (DESIGN §6): metrics.jsonl, summary.json, TensorBoard events."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fileio import atomic_write


def _scalars(prefix: str, obj: Any) -> dict[str, float]:
    """Flatten nested dicts of numbers into ``a/b/c`` -> value."""
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix: float(obj)}
    if isinstance(obj, dict):
        out: dict[str, float] = {}
        for k, v in obj.items():
            if not str(k).startswith("_"):
                out.update(_scalars(f"{prefix}/{k}" if prefix else str(k), v))
        return out
    return {}


class RunLogger:
    """Appends one JSON line per epoch and mirrors every scalar to TensorBoard when it is installed.

    ``on_epoch`` (e.g. a console echo) is called with each record after it is written.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.out_dir, self.on_epoch = out_dir, on_epoch
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop lines of epochs after the checkpoint (work the checkpoint does not hold)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epoch]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def epoch(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for key, value in _scalars("", {k: v for k, v in record.items() if k != "epoch"}).items():
                self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()
        if self.on_epoch is not None:
            self.on_epoch(record)

    def history(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
