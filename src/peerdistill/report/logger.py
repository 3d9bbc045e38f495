"""What a run leaves behind (DESIGN §6): metrics.jsonl/.csv, steps.jsonl, summary.json, TensorBoard, W&B."""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PeerdistillError
from ..fileio import atomic_write
from ..notices import note_once

def flatten(obj: Any, prefix: str = "") -> dict[str, int | float]:
    """Flatten nested dicts of numbers into ``{"a/b/c": value}``.

    Keys starting with ``_`` (e.g. ``_reliability`` bins) and non-numbers (strings, ``None``, bools) are
    left out; ints stay ints so that ``epoch`` and ``step`` read as integers in the CSV.
    """
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix: obj}
    if not isinstance(obj, dict):
        return {}
    out: dict[str, int | float] = {}
    for k, v in obj.items():
        if not str(k).startswith("_"):
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (``[]`` if it does not exist).

    A line that does not parse (the torn tail of a process killed mid-write) is skipped, not fatal:
    the other lines are still good history.
    """
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` flattened (see :func:`flatten`) as one CSV row each, atomically.

    Columns are the union over all records in first-seen order, blank where a record has no value:
    epochs without evaluation have no ``val/…`` or ``test/…`` columns, and a resumed run may add heads.
    """
    rows = [flatten(r) for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


class RunLogger:
    """Writes a run's metric history and mirrors its scalars to TensorBoard and Weights & Biases.

    Files in ``out_dir``: ``metrics.jsonl`` (one line per epoch, fsynced: it is the run's record),
    ``metrics.csv`` (the same, flattened, rewritten after every epoch) and ``steps.jsonl`` (one line
    every ``log_every`` steps, for loss curves finer than the epoch).

    Args:
        out_dir: the run directory.
        tensorboard: mirror scalars to ``out_dir/tb``; needs the ``tensorboard`` extra (a note if missing).
        on_epoch: called with each epoch record after it is written (e.g. a console echo).
        wandb: log the epoch scalars to Weights & Biases (the ``wandb`` extra). ``WANDB_PROJECT`` names the
            project (default ``peerdistill``), ``WANDB_MODE=offline`` logs locally; the W&B run id is kept
            in ``out_dir/wandb_id`` so that a resumed run continues the same W&B run.
        config: the resolved run config, stored with the W&B run.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 wandb: bool = False, config: dict[str, Any] | None = None) -> None:
        self.out_dir, self.on_epoch = out_dir, on_epoch
        self.path = out_dir / "metrics.jsonl"
        self.steps_path = out_dir / "steps.jsonl"
        self.csv_path = out_dir / "metrics.csv"
        self.tb = _tensorboard(out_dir / "tb") if tensorboard else None
        self.wandb = _wandb_run(out_dir, config) if wandb else None

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop the records of work after the checkpoint's ``epoch`` (it does not hold that work).

        Step records carry a fractional epoch; those of epoch ``epoch + 1`` are ``> epoch`` and go too.
        """
        for path in (self.path, self.steps_path):
            if path.exists():
                _write_lines(path, [r for r in read_jsonl(path) if r.get("epoch", 0) <= epoch])
        write_csv(self.csv_path, self.history())

    def epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch's record, rewrite the CSV and mirror the scalars (x = epoch)."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_csv(self.csv_path, self.history())
        scalars = flatten({k: v for k, v in record.items() if k != "epoch"})
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["epoch"])
        if self.on_epoch is not None:
            self.on_epoch(record)

    def step(self, record: dict[str, Any]) -> None:
        """Append a per-step record to ``steps.jsonl``.

        Args:
            record: ``{"step": global step, "epoch": fractional epoch, "loss": {term: value}, "lr": lr}``.
                Flushed, not fsynced: it refines the loss curve, the epoch records are the results.
        """
        with self.steps_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:  # tagged step/… with x = global step, beside the per-epoch means
            for key, value in flatten({k: v for k, v in record.items() if k not in ("step", "epoch")}).items():
                self.tb.add_scalar(f"step/{key}", value, record["step"])

    def history(self) -> list[dict[str, Any]]:
        """The epoch records written so far (``metrics.jsonl``)."""
        return read_jsonl(self.path)

    def step_history(self) -> list[dict[str, Any]]:
        """The per-step records written so far (``steps.jsonl``)."""
        return read_jsonl(self.steps_path)

    def close(self) -> None:
        """Flush and close TensorBoard and finish the W&B run."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # an optional extra: say so, or the user looks for events that never come
        note_once("tensorboard is not installed (pip install 'peerdistill[tensorboard]'); no tb/ events are written")
        return None
    return SummaryWriter(str(log_dir))


def _wandb_run(out_dir: Path, config: dict[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError:
        raise PeerdistillError("wandb=true needs the wandb package: pip install 'peerdistill[wandb]'") from None
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "peerdistill"), name=out_dir.name,
                          dir=str(out_dir), config=config, resume="allow", id=_wandb_id(out_dir))
    except wandb.errors.Error as e:  # not logged in, no network, ...: one line, not wandb's traceback
        reason = " ".join(str(e).split()) or type(e).__name__
        raise PeerdistillError(f"cannot start Weights & Biases: {reason}; run `wandb login` or set "
                               f"WANDB_MODE=offline") from None


def _wandb_id(out_dir: Path) -> str:
    """The run's W&B id, made once and kept in the run directory so that a resume continues that run."""
    id_file = out_dir / "wandb_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    atomic_write(id_file, lambda f: f.write(f"{run_id}\n".encode()))  # makes out_dir if needed
    return run_id

