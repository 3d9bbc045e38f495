"""Train / resume / evaluate a run directory: the functions behind the CLI and the Python API."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import config as C
from ..errors import PeerdistillError
from ..report.logger import RunLogger, write_json
from ..report.plots import plot_history, plot_reliability
from .checkpoint import load_checkpoint, resolve_checkpoint
from .distributed import teardown
from .trainer import Trainer


class ProgressBar:
    """A tqdm bar per epoch with the live loss and speed (on a terminal only)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}",
                        leave=False, dynamic_ncols=True, disable=None)

    def on_step(self, i: int, terms: dict[str, torch.Tensor]) -> None:
        self.bar.update(1)
        if (i + 1) % self.trainer.cfg.log_every == 0 and not self.bar.disable:
            speed = (i + 1) * self.trainer.cfg.batch_size / (time.perf_counter() - self.t0)
            loss = float(torch.stack([v.float() for v in terms.values()]).sum())
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{speed:.0f}")

    def close(self) -> None:
        self.bar.close()


def default_out_dir(cfg: C.Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.method.name}-{cfg.model.name.replace(',', '+')}-{cfg.data.name}-s{cfg.seed}"
    return Path("runs") / f"{name}-{stamp}"


def train(cfg: C.Config, out_dir: str | Path | None = None, resume: str | Path | None = None,
          echo: bool = True) -> dict[str, Any]:
    """Train (or resume) a run; returns its summary (also written to ``summary.json``)."""
    if resume is not None:
        out = Path(resume)
        resolve_checkpoint(out)  # a clear error before any work if there is nothing to resume
    else:
        out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
        if (out / "checkpoints" / "last.pt").exists():
            raise PeerdistillError(f"{out} already holds a run; use --resume {out} or another --out")
    trainer = Trainer(cfg, out)
    main = trainer.dist.is_main
    on_epoch = (lambda rec: _echo_epoch(rec, cfg.epochs)) if echo else None
    logger = RunLogger(out, cfg.tensorboard, on_epoch) if main else None
    trainer.logger = logger
    if main:
        out.mkdir(parents=True, exist_ok=True)
        C.save(cfg, out / "config.yaml")
    if resume is not None:
        trainer.load(resolve_checkpoint(out))
        if logger is not None:
            logger.truncate_after(trainer.epoch)
        if echo and main:
            print(f"resuming {out} at epoch {trainer.epoch}/{cfg.epochs}", file=sys.stderr)
    if echo and main:
        print(f"run {out}: {cfg.method.name} x{len(trainer.cohort)} {cfg.model.name} on {cfg.data.name} "
              f"({len(trainer.data.train)} train / {len(trainer.data.val) if trainer.data.val else 0} val / "
              f"{len(trainer.data.test)} test), {trainer.precision.name}, "
              f"{'channels_last' if trainer.channels_last else 'NCHW'}, {trainer.device}", file=sys.stderr)
    try:
        summary = trainer.fit(ProgressBar if cfg.progress and main else None)
        if main:
            finish(trainer, out, summary, logger)
        trainer.dist.barrier()  # under torchrun, every rank ends once rank 0 has written the summary
    finally:
        teardown()
    return summary


def _echo_epoch(rec: dict[str, Any], epochs: int) -> None:
    heads = ", ".join(f"{h} {m['top1']:.2f}" for h, m in rec["test"].items() if "top1" in m and h != "peers_mean")
    print(f"epoch {rec['epoch']}/{epochs}  loss {rec['loss']['loss']:.4f}  {rec['seconds']:.1f}s "
          f"({rec['images_per_s']:.0f} img/s)  test top-1: {heads}", file=sys.stderr, flush=True)


def finish(trainer: Trainer, out: Path, summary: dict[str, Any], logger: RunLogger | None) -> None:
    """Write summary.json and the plots."""
    write_json(out / "summary.json", summary)
    rel = trainer.evaluate(trainer.data.test, with_reliability=True)["_reliability"]
    if logger is not None:
        plot_history(logger.history(), out)
        logger.close()
    plot_reliability(rel, out)


def evaluate(path: str | Path, which: str = "last.pt") -> dict[str, Any]:
    """Re-evaluate a saved run (directory or checkpoint) on its validation and test sets."""
    ckpt_path = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path)
    cfg = C.from_dict(ckpt["config"])
    cfg.tensorboard = False
    trainer = Trainer(cfg, None)
    trainer.load(ckpt_path)
    val = trainer.evaluate(trainer.data.val) if trainer.data.val is not None else {}
    return {"checkpoint": str(ckpt_path), "epoch": trainer.epoch, "val": val,
            "test": trainer.evaluate(trainer.data.test)}


def format_table(summary_test: dict[str, Any], best: dict[str, Any] | None = None) -> str:
    """A small text table: per head, test top-1 / ECE at the last epoch (and at best validation)."""
    rows = [f"{'head':<12}{'top-1':>8}{'top-5':>8}{'NLL':>8}{'ECE':>7}" + ("   best-val top-1 (epoch)" if best else "")]
    for head, m in summary_test.items():
        if "ece" not in m:
            continue
        line = f"{head:<12}{m['top1']:>8.2f}{m['top5']:>8.2f}{m['nll']:>8.3f}{m['ece']:>7.2f}"
        if best and head in best:
            line += f"   {best[head]['test']['top1']:>6.2f} ({best[head]['epoch']})"
        rows.append(line)
    return "\n".join(rows)
