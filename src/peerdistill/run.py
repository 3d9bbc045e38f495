"""Train / resume / evaluate a run directory: the functions behind the CLI and the Python API.

Above the engine (which trains) and the evaluation (which a config's ``robustness`` runs after training):
this module owns the run directory, its summary, plots and pending evaluation."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import config as C
from .engine.build import validate_config
from .engine.checkpoint import load_checkpoint, resolve_checkpoint
from .engine.distributed import teardown
from .engine.trainer import Trainer
from .errors import PeerdistillError
from .evaluation.robust import robust_evaluate
from .fileio import write_json
from .report.configs import NEUTRAL_KEYS, canon, flat_config, under
from .report.logger import RunLogger
from .report.plots import plot_history, plot_reliability
from .text import format_duration, plural, text_table


class ProgressBar:
    """A tqdm bar per epoch with the live loss and speed on a terminal; elsewhere (a batch job, ``nohup``,
    a CI log) one progress line every ``progress_every`` seconds."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}",
                        leave=False, dynamic_ncols=True, disable=None)

    def on_step(self, i: int, terms: dict[str, torch.Tensor]) -> None:
        self.bar.update(1)
        cfg, now = self.trainer.cfg, time.perf_counter()
        if self.bar.disable and now - self.last < cfg.progress_every:
            return
        if not self.bar.disable and (i + 1) % cfg.log_every:
            return
        speed = (i + 1) * cfg.batch_size / (now - self.t0)
        loss = float(torch.stack([v.float() for v in terms.values()]).sum())
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{speed:.0f}")
            return
        self.last = now
        steps = self.trainer.steps_per_epoch
        left = (steps - i - 1) * cfg.batch_size / max(speed, 1e-9)
        print(f"epoch {self.trainer.epoch + 1}/{cfg.epochs}  step {i + 1}/{steps}  loss {loss:.4f}  "
              f"{speed:.0f} img/s  epoch ends in {format_duration(left)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


ROBUST_PENDING = "robustness.pending"  # in a run folder: summary.json is written, eval.json not yet
RESUMABLE = NEUTRAL_KEYS  # what --resume may change: the keys that cannot change the numbers


def default_out_dir(cfg: C.Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.method.name}-{cfg.model.name.replace(',', '+')}-{cfg.data.name}-s{cfg.seed}"
    return Path("runs") / f"{name}-{stamp}"


def check_resume(cfg: C.Config, out: Path) -> None:
    """A resumed run continues exactly as configured: refuse any change that could alter its results."""
    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        raise PeerdistillError(f"{out} has no config.yaml: it is not a run directory")
    stored_cfg = C.load(stored_path, stored=True)
    validate_config(stored_cfg)  # resolved as ``cfg`` is: a run written before its defaults were stored compares equal
    stored, new = flat_config(_compared(stored_cfg)), flat_config(_compared(cfg))
    for key in sorted(set(stored) | set(new)):
        if under(key, RESUMABLE):
            continue
        a, b = stored.get(key), new.get(key)
        if canon(a) != canon(b):
            raise PeerdistillError(f"--resume continues {out} exactly as it was configured, but {key} would change "
                                   f"({a!r} -> {b!r}); only {', '.join(RESUMABLE)} may be given on resume "
                                   f"(to train longer or differently, start a new run)")


def _compared(cfg: C.Config) -> dict[str, Any]:
    """The config as ``--resume`` compares it: as stored, but the robustness section normalised (every option's
    value), so the same evaluation written with fewer or more of its defaults is no change."""
    d = cfg.to_dict()
    if cfg.robustness is not None:
        d["robustness"] = cfg.robustness.normalised()
    return d


def train(cfg: C.Config, out_dir: str | Path | None = None, resume: str | Path | None = None,
          echo: bool = True) -> dict[str, Any]:
    """Train (or resume) a run; returns its summary (also written to ``summary.json``).

    Everything is validated and built before the run directory is touched. Resuming a finished run
    trains nothing and rewrites nothing: it returns the stored summary.
    """
    validate_config(cfg)  # resolves the method's defaults (e.g. the cohort size) before comparing or writing
    if resume is not None:
        out = Path(resume)
        if out_dir is not None and Path(out_dir).resolve() != out.resolve():
            raise PeerdistillError("--resume continues a run in its own directory; --out cannot move it elsewhere")
        check_resume(cfg, out)
        ckpt = resolve_checkpoint(out)  # a clear error before any work if there is nothing to resume
        done = _finished_summary(out)
        if done is not None:
            if echo:
                print(f"{out} has already finished ({plural(done['epochs'], 'epoch')}); nothing to train",
                      file=sys.stderr)
            if (out / ROBUST_PENDING).exists():
                if echo:
                    print(f"running its pending robustness evaluation into {out / 'eval.json'}", file=sys.stderr)
                pending_robustness(out, cfg)
            return done
        load_checkpoint(ckpt, use_other=lambda other: f"copy it over {ckpt} to resume from its epoch")
    else:
        out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
        if (out / "checkpoints" / "last.pt").exists():
            raise PeerdistillError(f"{out} already holds a run; use --resume {out} or another --out")
    # What this attempt may remove if it fails before its first checkpoint: the folder if it makes it, else
    # the run files it adds (a sweep's folder already holds train.log and its records).
    existed = {name for name in ATTEMPT_FILES if (out / name).exists()} if out.exists() else None
    trainer = Trainer(cfg, out)
    main = trainer.dist.is_main
    logger = None
    try:
        if main:
            _reuse_note(out, resume is None and echo)
            prepare_run_dir(out, cfg, write_config=resume is None)
        on_epoch = (lambda rec: _echo_epoch(rec, cfg.epochs, len(trainer.cohort))) if echo else None
        logger = RunLogger(out, cfg.tensorboard, on_epoch, wandb=cfg.wandb, config=cfg.to_dict()) if main else None
        trainer.logger = logger
        summary = _fit(trainer, cfg, out, ckpt if resume is not None else None, logger, echo)
    except BaseException:
        if main and resume is None and trainer.saved_epoch is None:
            if logger is not None:
                logger.close()
            discard_attempt(out, existed)  # nothing finished: leave no half-made run for a later --out to reuse
        raise
    finally:
        if logger is not None:
            logger.close()
        trainer.release()
        teardown()
    return summary


def _fit(trainer: Trainer, cfg: C.Config, out: Path, ckpt: Path | None, logger: RunLogger | None,
         echo: bool) -> dict[str, Any]:
    """Load the checkpoint of a resumed run, train to the end and write the run's results."""
    main = trainer.dist.is_main
    if ckpt is not None:
        trainer.load(ckpt)
        _note_precision_change(trainer, echo and main)
    if logger is not None:  # a resume keeps the records up to its checkpoint; a new run, none of a dead attempt
        logger.truncate_after(trainer.epoch if ckpt is not None else -1)
    if ckpt is not None and echo and main:
        print(f"resuming {out} at epoch {trainer.epoch}/{cfg.epochs}", file=sys.stderr)
    if echo and main:
        print(f"run {out}: {cfg.method.name} x{len(trainer.cohort)} {cfg.model.name} on {cfg.data.name} "
              f"({len(trainer.data.train)} train / {len(trainer.data.val) if trainer.data.val else 0} val / "
              f"{len(trainer.data.test)} test), {trainer.precision.name}, "
              f"{'channels_last' if trainer.channels_last else 'NCHW'}, {trainer.device}", file=sys.stderr)
    summary = trainer.fit(ProgressBar if cfg.progress and main else None)
    if main:
        if not summary["final"]["test"]:  # killed after the last checkpoint, before the summary
            summary["final"] = _last_logged(logger)
        finish(trainer, out, summary, logger)
    trainer.dist.barrier()  # under torchrun, every rank ends once rank 0 has written the summary
    if main and cfg.robustness is not None:
        # Rank 0 alone, after the other ranks have left: none of them waits in a collective that a long
        # evaluation could time out. The run's trainer is reused: no second copy of data and networks.
        pending_robustness(out, cfg, trainer)
    return summary


ATTEMPT_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "steps.jsonl", "tb", "wandb_id", "checkpoints")


def _reuse_note(out: Path, new_run: bool) -> None:
    if new_run and (out / "config.yaml").is_file():
        print(f"note: {out} holds an attempt that ended before its first checkpoint; starting the run afresh there",
              file=sys.stderr)


def discard_attempt(out: Path, existed: set[str] | None) -> None:
    """Remove what a new run wrote before it failed without a checkpoint: the whole folder if it made it
    (``existed`` is None), else the run files it added (not those in ``existed``)."""
    if existed is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in set(ATTEMPT_FILES) - existed:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _finished_summary(out: Path) -> dict[str, Any] | None:
    """The stored summary of a run that finished, else ``None``."""
    path = out / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("final", {}).get("test") else None


def _last_logged(logger: RunLogger | None) -> dict[str, Any]:
    evaluated = [r for r in (logger.history() if logger is not None else []) if "test" in r]
    return {"val": evaluated[-1].get("val", {}), "test": evaluated[-1]["test"]} if evaluated else {"val": {}, "test": {}}


def prepare_run_dir(out: Path, cfg: C.Config, write_config: bool) -> None:
    """Create the run directory and prove it is writable before any training (one line if it is not)."""
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / "checkpoints" / ".write-test"
        probe.write_bytes(b"0")
        probe.unlink()
        if write_config:
            C.save(cfg, out / "config.yaml")
    except OSError as e:
        raise PeerdistillError(f"cannot write to run directory {out}: {(e.strerror or str(e)).lower()}") from None


def _echo_epoch(rec: dict[str, Any], epochs: int, peers: int) -> None:
    heads = ", ".join(f"{h} {m['top1']:.2f}" for h, m in rec.get("test", {}).items()
                      if "top1" in m and h != "peers_mean")
    loss = f"train loss {rec['loss']['loss']:.4f} (sum of all terms{f', {peers} peers' if peers > 1 else ''})"
    print(f"epoch {rec['epoch']}/{epochs}  {loss}  {rec['seconds']:.1f}s ({rec['images_per_s']:.0f} img/s)"
          + (f"  test top-1: {heads}" if heads else ""), file=sys.stderr, flush=True)


def _note_precision_change(trainer: Trainer, echo: bool) -> None:
    """One line when ``precision=auto`` resolves differently here than where the checkpoint was trained."""
    before, now = trainer.resumed_precision, trainer.precision.name
    if echo and before is not None and before != now:
        print(f"note: the checkpoint was trained in {before}, this machine continues in {now} "
              f"(precision={trainer.cfg.precision}): the continuation is not bit-exact", file=sys.stderr)


def finish(trainer: Trainer, out: Path, summary: dict[str, Any], logger: RunLogger | None) -> None:
    """Write summary.json and the plots; mark the robustness evaluation the config asks for as pending."""
    if trainer.cfg.robustness is not None:  # until eval.json has it, the run is not finished for a sweep
        (out / ROBUST_PENDING).touch()
    write_json(out / "summary.json", summary)
    # rank 0 alone (the other ranks wait at the barrier after the summary)
    rel = trainer.evaluate(trainer.data.test, with_reliability=True, shard=False)["_reliability"]
    if logger is not None:
        plot_history(logger.history(), out, logger.step_history())
    plot_reliability(rel, out)


def pending_robustness(out: Path, cfg: C.Config, trainer: Trainer | None = None) -> None:
    """Run the config's robustness evaluation into eval.json and clear the marker. A failure keeps the
    marker (and the parts already written), so ``--resume`` runs it again; the training results stay.
    ``trainer``: the run's own, reused for the evaluation instead of building another."""
    try:
        robust_evaluate(out, dataclasses.replace(cfg.robustness), "last.pt", cfg.threads or None, trainer=trainer)
    except PeerdistillError as e:
        raise PeerdistillError(f"training finished (summary.json is written) but the robustness evaluation "
                               f"failed: {e}; `peerdistill train --resume {out}` runs it again") from None
    (out / ROBUST_PENDING).unlink(missing_ok=True)


def evaluate(path: str | Path, which: str | None = None) -> dict[str, Any]:
    """Re-evaluate a saved run (directory or checkpoint) on its validation and test sets.

    Args:
        path: a run directory or a checkpoint file.
        which: the checkpoint of a run directory (``last.pt`` when not given); one that does not exist is an error.
    """
    ckpt_path = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path, use_other=lambda other: f"--checkpoint {other.name}")
    cfg = C.from_dict(ckpt["config"], stored=True)
    cfg.tensorboard = False
    trainer = Trainer(cfg, None)
    trainer.load(ckpt_path)
    val = trainer.evaluate(trainer.data.val) if trainer.data.val is not None else {}
    return {"checkpoint": str(ckpt_path), "epoch": trainer.epoch, "val": val,
            "test": trainer.evaluate(trainer.data.test)}


def format_table(summary_test: dict[str, Any], best: dict[str, Any] | None = None) -> str:
    """A small text table: per head, test top-1 / ECE at the last epoch (and at best validation)."""
    header = ["head", "top-1", "top-5", "NLL", "ECE"] + (["test top-1 at best val (epoch)"] if best else [])
    rows = []
    for head, m in summary_test.items():
        if "ece" not in m:
            continue
        row = [head, f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['nll']:.3f}", f"{m['ece']:.2f}"]
        if best:
            b = best.get(head)
            row.append(f"{b['test']['top1']:.2f} ({b['epoch']})" if b else "-")
        rows.append(row)
    return "\n".join(text_table(header, rows, "lrrrrr"))
