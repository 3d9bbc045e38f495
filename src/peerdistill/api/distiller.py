"""Every method in one's own training loop: the :class:`Distiller` (docs/api.md).

A thin owner of the engine's own pieces: the method (its ``make_views``, ``losses``, ``update``), the
cohort of peers (:class:`~peerdistill.models.cohort.Cohort`, any ``nn.Module`` through
:func:`~peerdistill.models.adapt.adapt`), the EMA copy (:class:`~peerdistill.engine.ema.EMA`), the frozen
teacher (:func:`~peerdistill.engine.build.load_teacher`), the mixer and the add-on; the peers' and the
frozen copies' outputs and the loss terms come from :mod:`peerdistill.engine.step`, the functions the
engine's trainer calls. It builds the :class:`~peerdistill.methods.base.StepRecord` the engine would build
for the same inputs, so a method gives
the same loss terms here as in ``peerdistill train`` (tests/test_api.py checks it step by step for DML).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.loader import Batch
from ..data.mix import MIXERS
from ..data.views import ViewContext, Views
from ..engine.build import load_teacher
from ..engine.ema import EMA
from ..engine.step import ema_outputs, loss_terms, peer_outputs, teacher_outputs
from ..errors import PeerdistillError
from ..methods import ADDONS, METHODS, DataInfo, Method, PreTrainContext, StepRecord
from ..models.adapt import adapt, check_peers
from ..models.cohort import Cohort, branch

TOTAL = "total"


def ce_term(name: str) -> bool:
    """Whether a loss term is a cross-entropy with the labels (its name starts with ``ce``: ``ce0``,
    ``ce_ens``, ``ce_aux1_2`` ...)."""
    return name.startswith("ce")


class Distiller(nn.Module):
    """A distillation method applied to the user's own models, in the user's own loop.

    Example::

        d = Distiller([net_a, net_b], "dml", input_shape=(1, 28, 28), temperature=2.0)
        opt = torch.optim.SGD(d.parameters(), lr=0.05, momentum=0.9)
        for x, y in loader:
            terms = d.losses(x, y)         # named terms and "total" (the CE terms included)
            opt.zero_grad(); terms["total"].backward(); opt.step()
            d.after_step()                 # EMA copies, memory banks, stored predictions

    Args:
        models: the peers, one ``nn.Module`` each (the method's cohort size must match): a
            :class:`~peerdistill.models.base.StagedNet`, a model with timm's ``forward_features`` /
            ``forward_head`` or ``forward_intermediates``, or any module with ``layers`` to tap.
        method: a registered method (``peerdistill list methods``).
        input_shape: ``(channels, height, width)`` of one input image (methods size their state from it).
        train_labels: the training set's labels, for methods that keep per-image state (MCL's
            ``contrast=bank``, PS-KD's stored predictions, CS-KD's pairs): pass each row's dataset index
            to :meth:`losses` then.
        layers, classifier: how to read models that are not StagedNets (see :func:`adapt`).

    A method whose cohort is branched (PCL, ONE, CL-ILR, OKDDip) shares the trunk of StagedNets of one
    architecture as the engine does (the models are tied in place); other models run as independent peers,
    which PCL and DKEL accept and the methods that read the trunk (ONE, CL-ILR, OKDDip) refuse.
        mixer, mixer_args: a registered mixed-sample augmentation applied to every batch as the engine does.
        addon, addon_args: a loss add-on composed with the method (e.g. ``sd_dropout``).
        augment: float batch -> float batch, applied once per view the method makes (per-peer views
            of PCL, DKEL, KDCL get independent calls); default: none.
        epochs, steps_per_epoch: the schedule the method's ramp-ups read (epoch = steps done //
            steps_per_epoch).
        lr, weight_decay: what methods taking virtual SGD steps read (L-MCL's meta step).
        seed: seeds the generator of mixing and view draws.
        **params: the method's own parameters, validated as in a config.
    """

    def __init__(self, models: Sequence[nn.Module], method: str = "dml", *,
                 input_shape: Sequence[int], train_labels: Sequence[int] | Tensor | np.ndarray | None = None,
                 layers: Sequence[str] = (), classifier: str | None = None,
                 mixer: str | None = None, mixer_args: dict[str, Any] | None = None,
                 addon: str | None = None, addon_args: dict[str, Any] | None = None,
                 augment: Callable[[Tensor], Tensor] | None = None, epochs: int = 1, steps_per_epoch: int = 1,
                 lr: float = 0.0, weight_decay: float = 0.0, seed: int = 0, **params: Any) -> None:
        super().__init__()
        if isinstance(models, nn.Module) or not len(models):
            raise PeerdistillError("models must be a list of nn.Module peers (one per network of the method)")
        if len(tuple(input_shape)) != 3:
            raise PeerdistillError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
        self.method: Method = METHODS.build(method, **params)
        needs, self.name = self.method.needs, method
        if needs.peers is not None and len(models) != needs.peers:
            raise PeerdistillError(f"method {method!r} trains exactly {needs.peers} network"
                                   f"{'s' if needs.peers > 1 else ''}; got {len(models)} models")
        if len(models) < needs.min_peers:
            raise PeerdistillError(f"method {method!r} needs at least {needs.min_peers} peers, got {len(models)}")
        if mixer is not None and not needs.mixing:
            raise PeerdistillError(f"method {method!r} as configured does not support mixers (mixer={mixer})")
        nets = [adapt(m, layers, classifier) for m in models]
        classes = {n.num_classes for n in nets}
        if len(classes) > 1:
            raise PeerdistillError(f"the models disagree on the number of classes: {sorted(classes)}")
        c, h, w = (int(v) for v in input_shape)
        check_peers(nets, c, (h, w))
        if needs.topology == "branched" and all(getattr(n, "splittable", True) for n in nets) and \
                len({type(n) for n in nets}) == 1:  # the engine's branched cohort: the models are tied in place
            # the trunk's gradient is the branches' mean if the method declares it, as the engine builds it
            scale = 1.0 / len(nets) if needs.trunk_grad == "mean" else 1.0
            self.cohort = branch(nets, needs.split_after, type(models[0]).__name__, trunk_grad_scale=scale)
        else:
            self.cohort = Cohort(nets)
        self.num_classes = classes.pop()
        labels = torch.as_tensor(np.asarray(train_labels) if train_labels is not None else np.zeros(0, np.int64))
        self.per_image = train_labels is not None
        info = DataInfo(self.num_classes, len(labels), labels.long().cpu(), c, (h, w))
        self.method.setup(self.cohort, info)
        self.addons = nn.ModuleList([ADDONS.build(addon, **(addon_args or {}))] if addon else [])
        for a in self.addons:
            a.setup(self.method, self.cohort, info)
        self.mixer = MIXERS.build(mixer, **(mixer_args or {})) if mixer is not None else None
        self.ema = (EMA(self.cohort, needs.ema_decay, needs.ema_warmup, "own" if needs.ema_train_mode else "copy")
                    if needs.ema_decay is not None else None)
        self.teacher = (load_teacher(needs.teacher, needs.teacher_peer, self.num_classes, c, needs.teacher_model)
                        if needs.teacher else None)
        self.augment = augment
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.lr, self.weight_decay = lr, weight_decay
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.prepared = type(self.method).before_training is Method.before_training
        self._rec: StepRecord | None = None
        self._skip = {id(p) for g in self._groups() if not g.optimized for p in g.params}

    # ------------------------------------------------------------------ what the optimizer trains
    def _groups(self) -> list[Any]:
        return [*self.method.param_groups(), *(g for a in self.addons for g in a.param_groups())]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Every parameter the user's optimizer must train: the peers', the method's (projection heads,
        gates, ensemble classifiers) and the add-on's; not the EMA copy, the teacher, or parameters a
        method updates itself."""
        seen: set[int] = set()
        for module in (self.cohort, self.method, self.addons):
            for p in module.parameters(recurse):
                if p.requires_grad and id(p) not in seen and id(p) not in self._skip:
                    seen.add(id(p))
                    yield p

    def param_groups(self) -> list[dict[str, Any]]:
        """:meth:`parameters` as optimizer groups: a method's parameters with their own weight decay
        (FFL's fusion module) get a group of their own."""
        special = [g for g in self._groups() if g.optimized]
        own = {id(p) for g in special for p in g.params}
        groups = [{"params": [p for p in self.parameters() if id(p) not in own]}]
        groups += [{"params": list(g.params), **({"weight_decay": g.weight_decay} if g.weight_decay is not None
                                                  else {})} for g in special]
        return groups

    # ------------------------------------------------------------------ one step
    def views(self, images: Tensor | Sequence[Tensor], labels: Tensor, index: Tensor | None = None) -> Views:
        """The inputs of one step, as the method makes them (per-peer views, mixing, pairs)."""
        if self.per_image and index is None:
            raise PeerdistillError(f"method {self.name!r} was given train_labels: pass each row's dataset index "
                                   f"(losses(images, labels, index))")
        first = images[0] if isinstance(images, (list, tuple)) else images
        if index is None:
            index = torch.arange(len(labels), device=labels.device)
        ctx = ViewContext(self._augmenter(images), lambda x: x, self.mixer, self.gen, len(self.cohort),
                          self._teacher_logits if self.teacher is not None else None, self._peer_logits)
        return self.method.make_views(Batch(first, labels, index), ctx)

    def _augmenter(self, images: Tensor | Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
        """Per-view inputs: the user's ``augment`` on every call, or the user's own per-peer views in order."""
        if not isinstance(images, (list, tuple)):
            return self.augment if self.augment is not None else (lambda x: x)
        if len(images) != len(self.cohort):
            raise PeerdistillError(f"{len(images)} image batches given for {len(self.cohort)} peers")
        given = iter(images)

        def next_view(_x: Tensor) -> Tensor:
            try:
                return next(given)
            except StopIteration:
                raise PeerdistillError(f"method {self.name!r} makes more views than the {len(images)} batches "
                                       f"given; pass one batch and an augment instead") from None
        return next_view

    @torch.no_grad()
    def _teacher_logits(self, x: Tensor) -> Tensor:
        return self.teacher([x])[0].logits

    @torch.no_grad()
    def _peer_logits(self, i: int, x: Tensor) -> Tensor:
        views: list[Tensor | None] = [None] * len(self.cohort)
        views[i] = x
        return self.cohort(views, ())[i].logits

    def record(self, views: Views) -> StepRecord:
        """The :class:`StepRecord` of one step: every peer on its view (with gradient) and on each extra
        input, the EMA copy and the teacher on the same inputs (no gradient)."""
        needs = self.method.needs
        outputs, extra = peer_outputs(self.cohort, views, needs.taps)
        ema = ema_outputs(self.ema.module, views.peers, needs.taps, needs.ema_train_mode) if self.ema else None
        teacher, teacher_extra = teacher_outputs(self.teacher, views) if self.teacher is not None else (None, {})
        return StepRecord(views=views.peers, outputs=outputs, heads=self.cohort.heads, num_classes=self.num_classes,
                          extra=extra, ema=ema, teacher=teacher, teacher_extra=teacher_extra,
                          extra_views={k: e.views for k, e in views.extra.items()},
                          epoch=self.step // max(self.steps_per_epoch, 1), step=self.step,
                          steps_per_epoch=self.steps_per_epoch, total_epochs=self.epochs, lr=self.lr,
                          weight_decay=self.weight_decay)

    def losses(self, images: Tensor | Sequence[Tensor], labels: Tensor, index: Tensor | None = None
               ) -> dict[str, Tensor]:
        """The method's named, weighted loss terms on one batch, plus ``"total"``, their sum (what the
        engine backpropagates). Terms named ``ce...`` are cross-entropies with the labels and are part of
        the total: do not add a CE of your own. ``images``: one (B, C, H, W) float batch, or one batch per
        peer (per-peer views of your own making)."""
        if not self.prepared:
            raise PeerdistillError(f"method {self.name!r} does work before training: call "
                                   f"distiller.before_training(batches) once first")
        self.cohort.train()
        for a in self.addons:
            a.train()
        rec = self.record(self.views(images, labels, index))
        terms = loss_terms(self.method, list(self.addons), rec)
        if TOTAL in terms:
            raise PeerdistillError(f"method {self.name!r} has a term named {TOTAL!r}")
        self._rec = rec
        terms[TOTAL] = torch.stack([t.float() for t in terms.values()]).sum()
        return terms

    def after_step(self) -> None:
        """After the optimizer step: the EMA copy's update, the method's state (memory banks, stored
        predictions), the step count."""
        if self._rec is None:
            raise PeerdistillError("after_step() follows losses() and the optimizer step; no losses() since the "
                                   "last after_step()")
        if self.ema is not None:
            self.ema.update(self.cohort)
        self.method.update(self._rec)
        self._rec = None
        self.step += 1

    def before_training(self, batches: Iterable[Any], lr: float | None = None) -> None:
        """The method's work before the first step (DKEL's teacher initialisation) on ``batches``, an
        iterable of ``(images, labels)`` or ``(images, labels, index)``; ``lr``: its base rate."""
        def views() -> Iterator[Views]:
            for b in batches:
                yield self.views(*b)

        def optimizer(params: Any, rate: float, momentum: float = 0.0) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=rate, momentum=momentum, weight_decay=self.weight_decay)

        self.method.before_training(PreTrainContext(self.cohort, self.ema.module if self.ema else None, views,
                                                    optimizer, self.lr if lr is None else lr,
                                                    contextlib.nullcontext, self.method.needs.taps))
        self.prepared = True

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of every evaluated head (each peer, their ensemble, EMA peers, the method's own heads)
        on one batch, in eval mode."""
        was = self.cohort.training
        self.cohort.eval()
        self.method.eval()
        try:
            taps = self.method.needs.taps
            outs = self.cohort([images] * len(self.cohort), taps)
            ema = None
            if self.ema is not None:
                self.ema.module.eval()
                ema = self.ema.module([images] * len(self.cohort), taps)
            return self.method.eval_heads(outs, ema)
        finally:
            self.cohort.train(was)
            self.method.train(was)

    def batch_indices(self, labels: Sequence[int] | np.ndarray, batch_size: int, epoch: int = 0, seed: int = 0
                      ) -> list[list[int]]:
        """One epoch of dataset indices composed as the method asks (random, m per class, anchor + partner
        pairs): ``DataLoader(ds, batch_sampler=d.batch_indices(ds_labels, 64, epoch))``."""
        labels = np.asarray(labels)
        sampler = self.method.needs.sampler
        sampler.check(labels, batch_size, 1)
        return sampler.epoch(labels, batch_size, 1, seed, epoch).tolist()

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return self.losses(*args, **kwargs)

