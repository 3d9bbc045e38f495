"""A saved run loaded for evaluation: its cohort, method, EMA copy and data, and nothing a training step
needs (no optimizer, gradient scaler, process group, DDP wrapper, teacher or training loader).

:func:`load_run` reads a run directory or checkpoint; :meth:`LoadedRun.from_trainer` takes a live
trainer at the end of training instead, so an evaluation run after training holds no second copy of the
data and networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import config as C
from ..data.loader import DataBundle
from ..engine import rng
from ..engine.build import build_run, make_augment, seed_everything
from ..engine.checkpoint import load_checkpoint, resolve_checkpoint
from ..engine.ema import EMA
from ..engine.heads import evaluated_heads
from ..engine.precision import configure_backends, resolve_channels_last, resolve_device, resolve_precision
from ..engine.trainer import Trainer
from ..errors import PeerdistillError
from ..methods.base import Method
from ..models.cohort import Cohort


@dataclass
class LoadedRun:
    """A run's networks in eval mode on its device, with its data and normalisation (``mean``/``std``:
    float32, (C, 1, 1))."""

    cfg: C.Config
    ckpt_path: Path
    epoch: int
    device: torch.device
    cohort: Cohort
    method: Method
    ema: nn.Module | None  # the EMA copy of the cohort, if the method keeps one
    taps: tuple[str, ...]
    data: DataBundle
    mean: Tensor
    std: Tensor

    @classmethod
    def from_trainer(cls, trainer: Trainer, ckpt_path: Path) -> LoadedRun:
        """The live ``trainer``'s networks, loaded with ``ckpt_path``."""
        trainer.load(ckpt_path)
        ema = trainer.ema.module if trainer.ema is not None else None
        aug = trainer.augment
        run = cls(trainer.cfg, ckpt_path, trainer.epoch, trainer.device, trainer.cohort, trainer.method, ema,
                  trainer.taps, trainer.data, aug.mean.to(trainer.device).float(), aug.std.to(trainer.device).float())
        trainer.module.eval()
        return run.eval()

    def eval(self) -> LoadedRun:
        self.cohort.eval()
        self.method.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def heads(self, x: Tensor) -> dict[str, Tensor]:
        """Every evaluated head's (B, K) output for (B, C, H, W) images in [0, 1]."""
        return evaluated_heads(self.cohort, self.ema, self.method, self.normalize(x), self.taps)


def load_run(path: str | Path, which: str | None = None, threads: int | None = None) -> LoadedRun:
    """Load a run directory's checkpoint ``which`` (default ``last.pt``), or a checkpoint file, for evaluation.

    The networks are built, placed and loaded as the run's trainer does it (same seed, device, memory
    format and RNG state), so an evaluation gives the numbers it gives on the trainer itself.
    """
    ckpt_path = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path, use_other=lambda other: f"--checkpoint {other.name}")
    cfg = C.from_dict(ckpt["config"], stored=True)
    cfg.tensorboard, cfg.wandb = False, False
    if threads is not None:
        cfg.threads = threads
    device = resolve_device(cfg.device)  # one process: under torchrun only rank 0 evaluates
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device, precision)
    configure_backends(device, cfg.deterministic)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    built = build_run(cfg, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cohort = built.cohort.to(device, memory_format=fmt)
    method = built.method.to(device, memory_format=fmt)
    needs = method.needs
    ema = None
    if needs.ema_decay is not None:
        ema = EMA(cohort, needs.ema_decay, needs.ema_warmup, "own" if needs.ema_train_mode else "copy").to(device)
    try:
        cohort.load_state_dict(ckpt["cohort"])
        method.load_state_dict(ckpt["method"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PeerdistillError(f"checkpoint {ckpt_path} does not match this run: {str(e).splitlines()[0][:200]}") \
            from None
    rng.restore(ckpt["rng"], 0, device)
    augment = make_augment(cfg, built.data.splits, channels_last)
    run = LoadedRun(cfg, ckpt_path, int(ckpt["epoch"]), device, cohort, method,
                    ema.module if ema is not None else None, needs.taps, built.data,
                    augment.mean.to(device).float(), augment.std.to(device).float())
    return run.eval()
