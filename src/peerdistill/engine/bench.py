"""``peerdistill bench``: images/s, step-time breakdown and memory of any config (DESIGN §7).

The headline throughput is timed with the phase timer off (timing phases synchronises the device);
the breakdown comes from a second timed pass with it on. :func:`bare_step_throughput` times the same
peers' plain forward / cross-entropy / backward / SGD step on a fixed batch: the ceiling the engine's
data path, distillation terms and bookkeeping are measured against.
"""
from __future__ import annotations

import copy
import json
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import Config
from ..errors import PeerdistillError
from ..text import format_duration, plural
from ..data.loader import Batch
from ..methods import METHODS
from ..models.cohort import build_cohort
from ..data.streamed import StreamSplits
from .build import cohort_size, load_splits, seed_everything, stream_image_size
from .distributed import teardown
from .precision import configure_backends, resolve_channels_last, resolve_device, resolve_precision
from .trainer import Trainer

PHASES = ("data", "forward", "losses", "backward", "optimizer", "update")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb() -> float:
    """Current resident set size in MB (``/proc``; falls back to the peak where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def rss_growth(samples: list[float]) -> float:
    """Mean RSS of the last quarter of the samples minus that of the first quarter, in MB.

    The allocator returns and re-takes tens of MB within every step, so comparing single samples
    reads that churn as growth; quarter means show a leak (steady growth) and hide the churn.
    """
    if len(samples) < 2:
        return 0.0
    q = max(len(samples) // 4, 1)
    return sum(samples[-q:]) / q - sum(samples[:q]) / q


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(trainer: Trainer) -> Iterator[Batch]:
    """Cycle the training loader forever, one reshuffled epoch after another."""
    epoch = 0
    while True:
        trainer.train_loader.set_epoch(epoch)
        yield from trainer.train_loader
        epoch += 1


def _timed(trainer: Trainer, batches: Iterator[Batch], steps: int, rss: list[float] | None = None) -> float:
    """Seconds for ``steps`` training steps, ending with a device sync and a finiteness check.

    ``rss``, if given, receives the resident set size after every step (a ~10 us read of ``/proc``).
    """
    _sync(trainer.device)
    t0 = time.perf_counter()
    terms: dict[str, Tensor] = {}
    for _ in range(steps):
        terms = trainer.train_step(next(batches))
        if rss is not None:
            rss.append(current_rss_mb())
    trainer._check_finite(terms)  # one host sync, as the training loop does at least once per epoch
    _sync(trainer.device)
    return time.perf_counter() - t0


def bench_config(cfg: Config) -> Config:
    """A throw-away copy of ``cfg``: no run directory output, no TensorBoard, no progress bar."""
    cfg = copy.deepcopy(cfg)
    cfg.tensorboard, cfg.progress = False, False
    return cfg


def run_bench(cfg: Config, steps: int = 20, warmup: int = 5, as_json: bool = False,
              epoch_size: int | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` untimed ones; print and return the report.

    Returns a dict with ``images_per_s`` (batch_size x steps / seconds, i.e. images through the whole
    cohort), ``images_per_s_per_peer``, ``data_images_per_s`` (the input pipeline alone: uint8 training
    batches on the device without the model; with ``data_workers`` when streaming), ``step_ms``, ``breakdown_ms`` / ``breakdown_pct`` per phase,
    ``peak_rss_mb``, ``rss_growth_mb`` over the timed steps, ``gpu_peak_mb`` (CUDA only),
    ``method_state_mb`` (the method's own parameters and buffers: banks, stored predictions, heads) and
    ``ema_mb``, and the config essentials. ``projected_run_s`` assumes ``epoch_size`` training images per
    epoch (default: this data's training split), reported as ``epoch_size``; ``projected_device_hours`` is that
    time x the processes (devices) that run it, e.g. GPU-hours = epochs x epoch_size / images_per_s x world_size
    / 3600 plus the evaluations.
    """
    if epoch_size is not None and epoch_size < cfg.batch_size:
        raise PeerdistillError(f"--epoch-size {epoch_size} is smaller than one batch ({cfg.batch_size})")
    cfg = bench_config(cfg)
    trainer = Trainer(cfg, None)
    try:
        report = _run(trainer, steps, warmup, epoch_size)
    finally:
        teardown()
    if trainer.dist.is_main:  # under torchrun: rank 0's view; batch_size is the global batch
        print(json.dumps(report) if as_json else format_report(report), flush=True)
    return report


def _mb(module: torch.nn.Module | None) -> float:
    """Bytes of a module's parameters and buffers, in MB."""
    if module is None:
        return 0.0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / 2**20


def _run(trainer: Trainer, steps: int, warmup: int, epoch_size: int | None = None) -> dict[str, Any]:
    cfg = trainer.cfg
    batches = _batches(trainer)
    trainer.timer.enabled = False
    for _ in range(warmup):
        trainer.train_step(next(batches))
    _sync(trainer.device)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    rss: list[float] = []
    seconds = _timed(trainer, batches, steps, rss)
    trainer.timer.reset()
    trainer.timer.enabled = True
    timed_seconds = _timed(trainer, batches, steps)
    trainer.timer.enabled = False
    peers = len(trainer.cohort)
    syncs = _host_syncs(trainer, batches) if trainer.device.type == "cuda" else None
    eval_s = _eval_seconds(trainer)
    data_rate = data_throughput(trainer, steps, warmup)
    size = epoch_size or len(trainer.data.train)
    steps_per_epoch = trainer.steps_per_epoch if epoch_size is None else epoch_size // cfg.batch_size
    epoch_s = steps_per_epoch * seconds / steps
    return {**_essentials(trainer, steps, warmup),
            "images_per_s": cfg.batch_size * steps / seconds,
            "images_per_s_per_peer": cfg.batch_size * steps / seconds / peers,
            "data_images_per_s": data_rate,
            "data_workers": getattr(trainer.data.train, "workers", None),
            "step_ms": 1000.0 * seconds / steps,
            **_breakdown(trainer.timer.totals, timed_seconds, steps),
            "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": rss_growth(rss),
            "gpu_peak_mb": (torch.cuda.max_memory_allocated(trainer.device) / 2**20
                            if trainer.device.type == "cuda" else None),
            "host_syncs_per_step": syncs,
            "method_state_mb": _mb(trainer.method) + sum(_mb(a) for a in trainer.addons),
            "ema_mb": _mb(trainer.ema),
            "eval_s": eval_s, "train_epoch_s": epoch_s, "epochs": cfg.epochs, "epoch_size": size,
            "projected_run_s": cfg.epochs * (epoch_s + eval_s),
            # every process holds a device (or a CPU share) for the whole run
            "projected_device_hours": cfg.epochs * (epoch_s + eval_s) * trainer.dist.world_size / 3600}


def _host_syncs(trainer: Trainer, batches: Iterator[Batch]) -> float:
    """CUDA only: device synchronisations per training step, counted by torch's sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                trainer.train_step(next(batches))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / 3


def data_throughput(trainer: Trainer, steps: int, warmup: int) -> float:
    """Images/s of the input pipeline alone: this process's uint8 training batches on the device (decoded,
    cropped and collated by the workers when streaming; index-gathered when in memory), no model. A loader
    of its own (seed and epochs apart from training's), ``warmup`` batches untimed (workers start)."""
    t = trainer
    loader = t.data.train.loader(t.train_loader.batch_size, True, t.cfg.seed + 7, t.dist.rank, t.dist.world_size,
                                 t.method.needs.sampler, t.host_views)

    def cycle() -> Iterator[Batch]:
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    batches = cycle()
    for _ in range(warmup):
        next(batches)
    _sync(t.device)
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += len(next(batches).labels)
    _sync(t.device)
    return images * t.dist.world_size / (time.perf_counter() - t0)


def _eval_seconds(trainer: Trainer) -> float:
    """Seconds of one end-of-epoch evaluation (validation and test splits)."""
    _sync(trainer.device)
    t0 = time.perf_counter()
    for split in (trainer.data.val, trainer.data.test):
        if split is not None:
            trainer.evaluate(split)
    _sync(trainer.device)
    return time.perf_counter() - t0


def _essentials(trainer: Trainer, steps: int, warmup: int) -> dict[str, Any]:
    cfg = trainer.cfg
    return {"device": str(trainer.device), "precision": trainer.precision.name,
            "channels_last": trainer.channels_last, "fused": trainer.cohort.fused,
            "threads": torch.get_num_threads(),
            "method": cfg.method.name, "model": cfg.model.name, "peers": len(trainer.cohort),
            "data": cfg.data.name, "image_shape": list(trainer.data.train.shape),
            "num_classes": trainer.num_classes, "batch_size": cfg.batch_size,
            "world_size": trainer.dist.world_size, "steps": steps, "warmup": warmup,
            "torch": torch.__version__}


def _breakdown(totals: dict[str, float], seconds: float, steps: int) -> dict[str, Any]:
    """Per-phase mean ms per step and share of the step; ``other`` is what no phase covers."""
    ms = {p: 1000.0 * totals.get(p, 0.0) / steps for p in PHASES}
    ms["other"] = max(1000.0 * seconds / steps - sum(ms.values()), 0.0)
    total = sum(ms.values()) or 1.0
    return {"timed_step_ms": 1000.0 * seconds / steps, "breakdown_ms": ms,
            "breakdown_pct": {p: 100.0 * v / total for p, v in ms.items()}}


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table ``peerdistill bench`` prints."""
    fmt = ("channels_last" if r["channels_last"] else "NCHW") + (", fused cohort" if r["fused"] else "")
    procs = f" x {r['world_size']} processes" if r["world_size"] > 1 else ""
    lines = [f"{r['method']} x{r['peers']} {r['model']} on {r['data']} {tuple(r['image_shape'])}, "
             f"batch {r['batch_size']}, {r['device']}, {r['precision']}, {fmt}, "
             f"{plural(r['threads'], 'thread')}{procs}, "
             f"torch {r['torch']}",
             f"{plural(r['steps'], 'timed step')} after {plural(r['warmup'], 'warm-up step')}",
             "",
             f"  images/s (through the cohort) {r['images_per_s']:10.1f}",
             f"  images/s per peer             {r['images_per_s_per_peer']:10.1f}",
             f"  input pipeline alone, images/s {r['data_images_per_s']:9.1f}"
             + (f" ({plural(r['data_workers'], 'worker')})" if r.get("data_workers") is not None else " (in memory)"),
             f"  step time                     {r['step_ms']:10.1f} ms",
             f"  peak RSS                      {r['peak_rss_mb']:10.1f} MB",
             f"  RSS growth over timed steps   {r['rss_growth_mb']:10.1f} MB (last vs first quarter)",
             f"  method state (banks, heads)   {r['method_state_mb']:10.1f} MB"
             + (f" (+ EMA copy {r['ema_mb']:.1f} MB)" if r["ema_mb"] else "")]
    if r.get("gpu_peak_mb") is not None:
        lines.append(f"  GPU peak allocated            {r['gpu_peak_mb']:10.1f} MB")
    if r.get("host_syncs_per_step") is not None:
        lines.append(f"  host syncs per step           {r['host_syncs_per_step']:10.1f}")
    lines.append(f"  projected run                 {format_duration(r['projected_run_s']):>10} "
                 f"({plural(r['epochs'], 'epoch')} x ({r['train_epoch_s']:.1f} s train + "
                 f"{r['eval_s']:.1f} s evaluation), "
                 f"{r['epoch_size']} training images per epoch: set --epoch-size for another data size)")
    lines.append(f"  projected {r['device'].split(':')[0].upper()}-hours         {r['projected_device_hours']:10.2f} "
                 f"({r['world_size']} x the projected run)")
    lines += ["", f"  {'phase':<12}{'ms/step':>10}{'%':>8}   (second pass, timed per phase: "
                  f"{r['timed_step_ms']:.1f} ms/step)"]
    for p, v in r["breakdown_ms"].items():
        lines.append(f"  {p:<12}{v:>10.2f}{r['breakdown_pct'][p]:>8.1f}")
    return "\n".join(lines)


def bare_step_throughput(cfg: Config, steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Images/s of the same peers' plain training step, with no data pipeline and no distillation.

    Each step runs every peer forward on one fixed, pre-normalised random batch (same precision and
    memory format as the engine would choose), sums their cross-entropies, backpropagates and takes one
    SGD step with the configured momentum / Nesterov / weight decay. Returns ``images_per_s`` (batch
    size x steps / seconds, as :func:`run_bench`), ``images_per_s_per_peer`` and the settings used.
    """
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device, precision)
    configure_backends(device, cfg.deterministic)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    splits = load_splits(cfg, device)
    if isinstance(splits, StreamSplits):  # the crops the streamed data would give
        c, h = splits.channels, stream_image_size(cfg, splits)
        w = h
    else:
        h, w, c = splits.train.images.shape[1:]
    seed_everything(cfg.seed)
    needs = METHODS.build(cfg.method.name, **cfg.method.args).needs
    # The same networks (and shared trunk, for branched methods) the engine would train.
    cohort = build_cohort(cfg.model_names, cohort_size(cfg, needs), splits.num_classes, c, cfg.model.args,
                          needs.topology, needs.split_after)
    cohort = cohort.to(device, memory_format=fmt).train()
    o = cfg.optim
    opt = torch.optim.SGD(cohort.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                          nesterov=o.nesterov and o.momentum > 0)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, c, h, w, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(splits.num_classes, (cfg.batch_size,), generator=g).to(device)

    def step() -> Tensor:
        with precision.autocast():
            outs = cohort([x] * len(cohort))
        loss = sum(torch.nn.functional.cross_entropy(o.logits.float(), y) for o in outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    _sync(device)
    seconds = time.perf_counter() - t0
    n = len(cohort)
    return {"images_per_s": cfg.batch_size * steps / seconds,
            "images_per_s_per_peer": cfg.batch_size * steps / seconds / n, "step_ms": 1000.0 * seconds / steps,
            "peers": n, "device": str(device), "precision": precision.name, "channels_last": channels_last,
            "batch_size": cfg.batch_size, "steps": steps, "warmup": warmup}
