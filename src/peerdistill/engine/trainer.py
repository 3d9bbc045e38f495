"""The one training loop every method runs in (DESIGN §3):

views -> forward (autocast) -> method.losses -> sum -> backward -> one optimizer step over cohort and
method -> EMA -> method.update. Evaluation of every head on validation and test after each epoch,
atomic checkpoints, exact resume.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..data.loader import Batch, DeviceSet
from ..data.streamed import StreamSet
from ..data.views import View, ViewContext, Views
from ..errors import PeerdistillError
from ..methods.base import AddOn, Method, PeerOutput, PreTrainContext, StepRecord
from ..metrics import HeadMetrics
from ..models.cohort import Cohort
from ..seeds import seed_stream
from . import distributed as dist
from . import rng
from .build import build_run, data_meta, host_views, load_teacher, make_augment, make_mixer, seed_everything
from .checkpoint import load_checkpoint, save_atomic, write_failure
from .ema import EMA
from .heads import evaluated_heads
from .optim import build_optimizer, lr_at, set_lr
from .precision import configure_backends, resolve_channels_last, resolve_device, resolve_precision
from .step import ema_outputs, loss_terms, peer_outputs, teacher_outputs
from .timer import PhaseTimer


class StepModule(nn.Module):
    """Cohort + method (+ add-ons) as one module: what DDP wraps, so every trainable parameter is
    synchronised and every forward with gradient happens inside one DDP forward call."""

    def __init__(self, cohort: Cohort, method: Method, addons: list[AddOn], timer: PhaseTimer) -> None:
        super().__init__()
        self.cohort, self.method, self.timer = cohort, method, timer
        self.addons = nn.ModuleList(addons)

    def forward(self, views: Views, taps: tuple[str, ...],
                record: Callable[[list[PeerOutput], dict[str, list[PeerOutput | None]]], StepRecord],
                ) -> tuple[dict[str, Tensor], StepRecord]:
        with self.timer("forward"):
            rec = record(*self.outputs(views, taps))
        with self.timer("losses"):
            return loss_terms(self.method, list(self.addons), rec), rec


    def outputs(self, views: Views, taps: tuple[str, ...]) -> tuple[list[PeerOutput], dict[str, list[PeerOutput | None]]]:
        """Every peer on its view (with gradient) and on each extra input (with gradient if it asks)."""
        return peer_outputs(self.cohort, views, taps)


class NonFiniteLoss(PeerdistillError):
    """A loss term became NaN or infinite."""


class Trainer:
    """Builds a run from a config and trains it.

    Args:
        cfg: the run config.
        out_dir: run directory (checkpoints, logs); ``None`` for throw-away runs (benchmarks).
        logger: receives epoch and step records (see :mod:`peerdistill.report.logger`); optional.
    """

    def __init__(self, cfg: Config, out_dir: Path | None = None, logger: Any = None) -> None:
        self.cfg, self.out_dir, self.logger = cfg, out_dir, logger
        self.dist = dist.setup(cfg.device, cfg.dist_timeout)
        self.device = self.dist.device if self.dist.world_size > 1 else resolve_device(cfg.device)
        if cfg.sync_bn and self.device.type != "cuda":
            raise PeerdistillError("sync_bn=true needs CUDA devices: torch's SyncBatchNorm has no CPU implementation")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.channels_last = resolve_channels_last(cfg.channels_last, self.device, self.precision)
        configure_backends(self.device, cfg.deterministic)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        built = build_run(cfg, self.device)
        self.data, self.method, self.cohort = built.data, built.method, built.cohort
        self.num_classes, self.meta = built.num_classes, data_meta(built)
        needs = self.method.needs
        self.taps = needs.taps
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.timer = PhaseTimer(False, self.device)
        self.module = StepModule(self.cohort, self.method, built.addons, self.timer).to(self.device, memory_format=fmt)
        if cfg.sync_bn and self.dist.world_size > 1:
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
            self.cohort, self.method = self.module.cohort, self.module.method
        self.addons = list(self.module.addons)
        self.ema = None
        if needs.ema_decay is not None:
            buffers = "own" if needs.ema_train_mode else "copy"
            self.ema = EMA(self.cohort, needs.ema_decay, needs.ema_warmup, buffers).to(self.device)
        self.teacher = None
        if needs.teacher:
            self.teacher = load_teacher(needs.teacher, needs.teacher_peer, self.num_classes,
                                        built.in_channels, needs.teacher_model).to(self.device, memory_format=fmt)
        self.step_fn = self.dist.wrap(self.module, needs.unused_params or any(a.unused_params for a in self.addons))
        special = [*self.method.param_groups(), *(g for a in self.addons for g in a.param_groups())]
        self.optimizer = build_optimizer([self.module], cfg.optim, special)
        self.trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scaler = self._new_scaler()
        self.augment = make_augment(cfg, self.data.splits, self.channels_last)
        self.augment.shard = (self.dist.rank, self.dist.world_size)  # global-batch draws, this rank's rows
        self.mixer = make_mixer(cfg)
        world, rank = self.dist.world_size, self.dist.rank
        if self.mixer is not None:
            self.mixer.check(world)
        if cfg.batch_size % world:
            raise PeerdistillError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
        self.host_views = host_views(needs, len(self.cohort))  # streamed data: host crops per image
        self.train_loader = self.data.train.loader(cfg.batch_size // world, True, cfg.seed, rank, world,
                                                   needs.sampler, self.host_views)
        self.steps_per_epoch = len(self.train_loader)
        self.epoch, self.step = 0, 0
        self.prepared = False  # before_training has run (its result lives in cohort / EMA / method state)
        self.saved_epoch: int | None = None
        self.best: dict[str, Any] = {}
        self.gen = torch.Generator(device="cpu")
        self.rank_rng: list[dict[str, Any]] = []  # every rank's RNG state at the end of the last epoch (DDP)
        self.resumed_precision: str | None = None  # the precision the loaded checkpoint was trained in

    # ------------------------------------------------------------------ training
    def view_context(self, gen: torch.Generator, batch: Batch | None = None) -> ViewContext:
        """What ``make_views`` may use: augmentation, mixer, and no-grad teacher / peer logits for scoring."""
        return ViewContext(self._augment_fn(gen, batch), self.augment.normalize, self.mixer, gen,
                           len(self.cohort), self._teacher_logits if self.teacher is not None else None,
                           self._peer_logits, self.augment.shard)

    def _augment_fn(self, gen: torch.Generator, batch: Batch | None) -> Callable[[Tensor], Tensor]:
        """The device augmentation; for a streamed batch, each augmentation of ``batch.images`` takes the next
        of its host crops (independent crops per view), and one more than it has is an error."""
        if batch is None or batch.views is None:
            return lambda x: self.augment(x, gen)
        taken = 0

        def augment(x: Tensor) -> Tensor:
            nonlocal taken
            if x is batch.images:
                if taken == batch.views.shape[1]:
                    raise PeerdistillError(f"method {self.cfg.method.name!r} augments a batch more than the "
                                           f"{taken} time(s) it declares (Needs.host_views); streamed data has "
                                           f"{taken} host crop(s) per image")
                x, taken = batch.views[:, taken], taken + 1
            return self.augment(x, gen)

        return augment

    @torch.no_grad()
    def _teacher_logits(self, x: Tensor) -> Tensor:
        with self.precision.autocast():
            return self.teacher([x])[0].logits

    @torch.no_grad()
    def _peer_logits(self, i: int, x: Tensor) -> Tensor:
        with self.precision.autocast():
            views: list[Tensor | None] = [None] * len(self.cohort)
            views[i] = x
            return self.cohort(views, ())[i].logits

    def train_step(self, batch: Batch) -> dict[str, Tensor]:
        """One training batch (one optimizer step, or one micro-step of ``optim.accum_steps``); returns
        the detached loss terms."""
        cfg, timer = self.cfg, self.timer
        accum, k = cfg.optim.accum_steps, self.step % self.steps_per_epoch  # k: batch within the epoch
        first, last = k % accum == 0, (k + 1) % accum == 0 or k + 1 == self.steps_per_epoch
        if first:
            set_lr(self.optimizer, lr_at(cfg.optim, self.step, self.steps_per_epoch, cfg.epochs))
        terms, rec = self._forward(batch, self.step_fn)
        with timer("backward"):
            total = torch.stack([t.float() for t in terms.values()]).sum()
            if first:
                self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total / accum if accum > 1 else total).backward()
        if last:
            with timer("optimizer"):
                if cfg.optim.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.trained, cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
        with timer("update"):
            if self.ema is not None and last:
                self.ema.update(self.cohort)
            self.method.update(rec)
        self.step += 1
        return {k: v.detach() for k, v in terms.items()}

    def release(self) -> None:
        """Drop the DDP wrapper (training is over): it holds the process group, which
        :func:`~peerdistill.engine.distributed.teardown` can then destroy with its threads."""
        self.step_fn = self.module

    def _forward(self, batch: Batch, step_fn: Callable[..., Any]) -> tuple[dict[str, Tensor], StepRecord]:
        """Views, frozen copies' outputs, the cohort's outputs and the loss terms of one batch."""
        cfg, timer = self.cfg, self.timer
        with timer("data"):
            views = self.method.make_views(batch, self.view_context(self.gen, batch))
        with self.precision.autocast():
            with timer("forward"):  # the frozen copies; the cohort and the loss terms are timed in StepModule
                ema_out = self._ema_forward(views.peers) if self.ema is not None else None
                teacher = self._teacher_forward(views) if self.teacher is not None else None

            def record(outputs: list[PeerOutput], extra: dict[str, list[PeerOutput | None]]) -> StepRecord:
                t_peers, t_extra = teacher if teacher is not None else (None, {})
                return StepRecord(views=views.peers, outputs=outputs, heads=self.cohort.heads,
                                  num_classes=self.num_classes, extra=extra, ema=ema_out, teacher=t_peers,
                                  teacher_extra=t_extra, extra_views={k: e.views for k, e in views.extra.items()},
                                  epoch=self.epoch, step=self.step, steps_per_epoch=self.steps_per_epoch,
                                  total_epochs=cfg.epochs, lr=self.optimizer.param_groups[0]["lr"],
                                  weight_decay=cfg.optim.weight_decay)

            return step_fn(views, self.taps, record)

    def step_record(self, batch: Batch) -> StepRecord:
        """The record ``Method.losses`` would get for ``batch`` now (outputs with gradient), without
        computing losses or changing any state but the generator and BN statistics: for tests and tools."""
        return self._forward(batch, lambda views, taps, record: ({}, record(*self.module.outputs(views, taps))))[1]

    def _ema_forward(self, views: list[View]) -> list[PeerOutput]:
        return ema_outputs(self.ema.module, views, self.taps, self.method.needs.ema_train_mode)

    def _teacher_forward(self, views: Views) -> tuple[list[PeerOutput], dict[str, list[PeerOutput | None]]]:
        return teacher_outputs(self.teacher, views)

    def before_training(self) -> None:
        """Run the method's before-training hook once per run (a resumed run has already done it)."""
        if self.prepared:
            return
        seed = seed_stream(self.cfg.seed, 0, 104_729)  # a stream of its own: the epochs' draws are unchanged
        loader = self.data.train.loader(self.train_loader.batch_size, True, seed, self.dist.rank,
                                        self.dist.world_size, self.method.needs.sampler, self.host_views)
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def batches() -> Iterator[Views]:
            gen.manual_seed(seed)
            for batch in loader:
                yield self.method.make_views(batch, self.view_context(gen, batch))

        def sgd_optimizer(params: Any, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=self.cfg.optim.weight_decay)

        ema = self.ema.module if self.ema is not None else None
        self.method.before_training(PreTrainContext(self.cohort, ema, batches, sgd_optimizer, self.cfg.optim.lr,
                                                    self.precision.autocast, self.taps, self._new_scaler))
        self.dist.broadcast(self.module)  # every rank starts from rank 0's result
        if ema is not None:
            self.dist.broadcast(ema)
        self.prepared = True

    def _new_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)

    def train_epoch(self, on_step: Callable[[int, dict[str, Tensor]], None] | None = None) -> dict[str, float]:
        """Train one epoch; returns mean loss terms and timing."""
        self.module.train()
        self.train_loader.set_epoch(self.epoch)
        # Same seed on every rank: augmentation draws are made for the global batch and sliced per rank.
        self.gen.manual_seed(seed_stream(self.cfg.seed, self.epoch))
        sums: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        check_every = 1 if self.device.type == "cpu" else max(self.cfg.log_every, 1)
        for i, batch in enumerate(self.train_loader):
            terms = self.train_step(batch)
            for k, v in terms.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            if (i + 1) % check_every == 0 or i + 1 == self.steps_per_epoch:
                self._check_finite(sums)
            # every log_every steps, and each epoch's last step: a run shorter than log_every has its records too
            if self.logger is not None and (self.step % self.cfg.log_every == 0 or i + 1 == self.steps_per_epoch):
                self.logger.step({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "loss": {k: float(v) for k, v in terms.items()},
                                  "lr": self.optimizer.param_groups[0]["lr"]})
            if on_step is not None:
                on_step(i, terms)
        seconds = time.perf_counter() - t0
        sums = self.dist.mean(sums)  # the global batch's loss terms under DDP
        out = {k: float(v) / self.steps_per_epoch for k, v in sums.items()}
        out["loss"] = sum(out.values())
        return {"loss": out, "seconds": seconds,
                "images_per_s": self.steps_per_epoch * self.cfg.batch_size / max(seconds, 1e-9),
                "lr": lr_at(self.cfg.optim, self.step - 1, self.steps_per_epoch, self.cfg.epochs)}

    def _check_finite(self, sums: dict[str, Tensor]) -> None:
        bad = [k for k, v in sums.items() if not bool(torch.isfinite(v))]
        if bad:
            last = self.out_dir / "checkpoints" / "last.pt" if self.out_dir else None
            kept = f"; last good checkpoint: {last}" if last and last.exists() else "; no checkpoint written yet"
            raise NonFiniteLoss(f"non-finite loss term {bad[0]!r} at step {self.step} (epoch {self.epoch + 1})"
                                f"{kept}")

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: DeviceSet | StreamSet, with_reliability: bool = False, shard: bool = True) -> dict[str, Any]:
        """Top-1/top-5/NLL/ECE of every head the method exposes, on a whole split.

        Under torchrun (and ``shard``) every process evaluates its contiguous share and the metrics' sums are
        added over the processes: the same counts as one process evaluating everything, on every rank.
        ``shard=False``: this process alone evaluates the whole split (the others are not in step)."""
        self.module.eval()
        if self.ema is not None:
            self.ema.module.eval()
        rank, world = (self.dist.rank, self.dist.world_size) if shard else (0, 1)
        loader = data.loader(self.cfg.data.eval_batch_size, False, rank=rank, world_size=world)
        ema = self.ema.module if self.ema is not None else None
        metrics: dict[str, HeadMetrics] = {}
        for batch in loader:
            x = self.augment.normalize(batch.images)
            with self.precision.autocast():
                heads = evaluated_heads(self.cohort, ema, self.method, x, self.taps)
            for name, logits in heads.items():
                metrics.setdefault(name, HeadMetrics()).update(logits, batch.labels)
        if world > 1:
            metrics = self._reduce_metrics(metrics)
        result: dict[str, Any] = {name: m.compute() for name, m in metrics.items()}
        peers = [v["top1"] for k, v in result.items() if k.startswith("peer")]
        result["peers_mean"] = {"top1": sum(peers) / len(peers)} if peers else {}
        if with_reliability:
            result["_reliability"] = {name: m.reliability() for name, m in metrics.items()}
        self.module.train()
        return result

    def _reduce_metrics(self, metrics: dict[str, HeadMetrics]) -> dict[str, HeadMetrics]:
        """Every head's sums added over the processes (a rank whose share is empty contributes zeros)."""
        names = self.dist.gather(sorted(metrics))
        heads = sorted({h for per_rank in names for h in per_rank})
        out = {h: metrics.get(h, HeadMetrics()) for h in heads}
        flat = torch.stack([out[h].totals(self.device) for h in heads])
        flat = self.dist.total(flat)
        return {h: HeadMetrics().add_totals(row) for h, row in zip(heads, flat)}

    # --------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"format": 1, "config": self.cfg.to_dict(), "data": self.meta, "epoch": self.epoch,
                "step": self.step, "prepared": self.prepared, "cohort": self.cohort.state_dict(),
                "method": self.method.state_dict(), "addons": [a.state_dict() for a in self.addons],
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "precision": self.precision.name, "rng": {"per_rank": self._rng_per_rank()}, "best": self.best}

    def _rng_per_rank(self) -> list[dict[str, Any]]:
        """Every rank's RNG state: the ranks' gathered at the end of the epoch, this rank's read now (before
        any gather, this rank's stands for every rank)."""
        own = rng.capture(self.device)
        states = list(self.rank_rng) or [own] * self.dist.world_size
        states[self.dist.rank] = own
        return states

    def save(self, name: str) -> Path | None:
        """Write ``checkpoints/<name>`` atomically; a failed write is one line saying what, why and how to
        continue (the previous file is left intact)."""
        if self.out_dir is None or not self.dist.is_main:
            return None
        path = self.out_dir / "checkpoints" / name
        state = self.state()
        kept = f"the previous {name} is intact; " if path.is_file() else ""
        try:
            save_atomic(state, path)
        except (OSError, RuntimeError) as e:
            since = (f"--resume {self.out_dir} continues from epoch {self.saved_epoch}" if self.saved_epoch
                     else "no checkpoint was written yet, so the run restarts from scratch")
            raise PeerdistillError(f"could not write {path} ({write_failure(e, path, state)}); {kept}{since}") from None
        if name == "last.pt":
            self.saved_epoch = self.epoch
        return path

    def load(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path)
        try:
            self.cohort.load_state_dict(ckpt["cohort"])
            self.method.load_state_dict(ckpt["method"])
            for addon, state in zip(self.addons, ckpt.get("addons") or []):
                addon.load_state_dict(state)
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise PeerdistillError(f"checkpoint {path} does not match this run: {str(e).splitlines()[0][:200]}") from None
        # A checkpoint trained without a scaler (CPU, bf16, fp32) has none to give an fp16 run, and an fp16
        # checkpoint's scaler means nothing to a run without one: the scaler then starts afresh.
        self.resumed_precision = ckpt.get("precision") or ("fp16" if ckpt.get("scaler") else None)
        if self.precision.use_scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        rng.restore(ckpt["rng"], self.dist.rank, self.device)
        self.epoch, self.step, self.best = int(ckpt["epoch"]), int(ckpt["step"]), dict(ckpt.get("best") or {})
        self.prepared = bool(ckpt.get("prepared", self.epoch > 0))
        self.saved_epoch = self.epoch

    # ---------------------------------------------------------------------- fit
    def fit(self, progress: Callable[[Trainer], Any] | None = None) -> dict[str, Any]:
        """Train from the current epoch to ``cfg.epochs``; returns the summary."""
        last_eval: dict[str, Any] = {}
        self.before_training()
        while self.epoch < self.cfg.epochs:
            bar = progress(self) if progress is not None else None
            train = self.train_epoch(bar.on_step if bar is not None else None)
            if bar is not None:
                bar.close()
            self.epoch += 1
            if self.dist.world_size > 1:  # rank 0 writes the checkpoint: it needs every rank's state
                self.rank_rng = self.dist.gather(rng.capture(self.device))
            last_eval = self._end_epoch(train) or last_eval  # every rank evaluates its share; rank 0 writes
            self.dist.barrier()
        return self.summary(last_eval)

    def evaluates_now(self) -> bool:
        """Every ``eval_every`` epochs and always after the last one."""
        return self.epoch % self.cfg.eval_every == 0 or self.epoch >= self.cfg.epochs

    def _end_epoch(self, train: dict[str, Any]) -> dict[str, Any]:
        """Evaluate (when due), checkpoint and log one epoch; returns the record if it was evaluated."""
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, **train}
        improved = False
        if self.evaluates_now():
            t0 = time.perf_counter()
            val = self.evaluate(self.data.val) if self.data.val is not None else {}
            test = self.evaluate(self.data.test)
            record.update(eval_seconds=time.perf_counter() - t0, val=val, test=test)
            improved = self._track_best(val, test)
        if self.dist.is_main:
            self.save("last.pt")
            if improved:
                self.save("best.pt")
            if self.logger is not None:
                self.logger.epoch(record)
        return record if "test" in record else {}

    def _track_best(self, val: dict[str, Any], test: dict[str, Any]) -> bool:
        """Per head: test metrics at the epoch of that head's best validation top-1; without a validation
        split, at the last evaluated epoch (``val_top1`` is then ``None``: there is no such number)."""
        improved = False
        for head, m in test.items():
            score = val.get(head, {}).get("top1", -math.inf) if val else None
            prev = self.best.get(head)
            if prev is None or score is None or prev["val_top1"] is None or score > prev["val_top1"]:
                self.best[head] = {"epoch": self.epoch, "val_top1": score, "test": m}
                improved |= head == "peers_mean"
        return improved

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"epochs": self.epoch, "final": {"val": last.get("val", {}), "test": last.get("test", {})},
                "best": self.best, "selection": "validation top-1, per head" if self.data.val is not None
                else "last epoch (no validation split)"}
