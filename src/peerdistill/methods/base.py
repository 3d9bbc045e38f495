"""The method contract (DESIGN §3): the engine computes, a method turns outputs into losses.

A method is an ``nn.Module`` (its own parameters and buffers join the optimizer and checkpoint) that
declares :class:`Needs` and implements a few hooks, all optional but ``losses``:

* ``setup(cohort, data)``: build projectors, gates, banks sized from the cohort and the data;
* ``make_views(batch, ctx)`` -> :class:`~peerdistill.data.views.Views` (default: from ``needs.views``,
  ``needs.mix`` and ``needs.peer_targets``);
* ``before_training(ctx)``: work before the first epoch (DKEL's teacher initialisation);
* ``losses(rec)`` -> named, already-weighted loss terms (the engine sums them);
* ``update(rec)``: state changes after the optimizer step (memory banks, stored predictions);
* ``eval_heads(outputs, ema)`` -> the logits of every evaluated head;
* ``param_groups()``: parameters that need their own weight decay or their own optimizer;
* ``feature_heads(rec)``: the features an add-on such as SD-Dropout acts on.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..collectives import all_gather_cat, global_batch, world_size  # noqa: F401  (methods import them here)
from ..data.loader import Batch
from ..data.samplers import Sampler
from ..data.views import Extra, View, ViewContext, Views
from ..models.base import PeerOutput
from ..registry import Registry
from .functional import cross_entropy, ensemble_log_probs, f32, soft_ce

RERUN = "on{}"  # extra input: every other peer re-run without gradient on peer i's view
UNMIXED = "unmixed"  # extra input: every peer on the unmixed batch, without gradient


@dataclass
class Needs:
    """What a method asks of the engine.

    Attributes:
        peers: a fixed number of networks (a config ``peers`` that disagrees is refused); ``None``: the
            config's ``peers``, or ``default_peers`` when the config leaves it unset.
        default_peers: the cohort size when neither the method fixes it nor the config sets it.
        min_peers: smallest cohort the method makes sense for.
        topology: ``"independent"`` networks or ``"branched"`` (a shared trunk plus per-peer branches).
        split_after: for branched cohorts, the last shared stage (``None``: all stages but the last).
        trunk_grad: for branched cohorts, the gradient the shared trunk receives from the branches: their
            ``"sum"``, or their ``"mean"`` (CL-ILR's backprop rescaling, 1/m).
        taps: stage names whose maps each peer output must carry (``"*"`` = every stage).
        views: ``"shared"``: one augmented view for every peer; ``"per_peer"``: an independent
            augmentation (crop, flip, cutout) of the same images for each peer (PCL, DKEL, KDCL).
        mix: with a mixer, ``"shared"``: one draw mixes every view alike (same partners, box, lambda);
            ``"per_view"``: an independent draw per peer view.
        peer_targets: under per-view mixing, what ``rec.peer_target(j, i)`` (peer j's prediction for the
            image peer i saw) is: ``"own"``: peer j's output on its own view (only meaningful when the
            views show the same images, i.e. without per-view mixing); ``"rerun"``: peer j re-run without
            gradient on peer i's input; ``"components"``: peer j's no-grad predictions on the unmixed
            batch, mixed with peer i's label weights.
        mixing: whether a mixer is meaningful for this method (``False``: a configured mixer is refused).
        sampler: batch composition (random, m per class, same-class pairs).
        ema_decay: keep an EMA copy of the cohort with this decay (``None``: no EMA copy).
        ema_warmup: ``"none"`` (fixed decay) or ``"meanteacher"`` (decay_t = min(1 - 1/(t+1), decay)).
        ema_train_mode: run the EMA copy in train mode (BN batch statistics), as PCL/DKEL do.
        teacher: path of a run directory or checkpoint whose peer is loaded frozen as the teacher, or
            ``MODEL:WEIGHTS``: a registered model initialised from a weights file (e.g. torchvision's).
        teacher_peer: which peer of that checkpoint is the teacher.
        teacher_model: if set, the teacher checkpoint must be this architecture.
        unused_params: some trainable parameter of the cohort or the method can get no gradient from a
            step's loss terms (e.g. modules reached only through detached targets). Under DDP this makes
            every step search the autograd graph for them (``find_unused_parameters``); declare it only
            when it is so: a parameter left without a gradient under a ``False`` declaration stops a
            multi-process run at its next step.
        host_views: how many times ``make_views`` augments ``batch.images`` in a step (each call an
            independent draw); ``None``: once per peer with ``views="per_peer"``, else once. Streamed data
            crops that many views of every image on the host, and a further call is an error.
    """

    peers: int | None = None
    default_peers: int = 2
    min_peers: int = 1
    topology: Literal["independent", "branched"] = "independent"
    split_after: str | None = None
    trunk_grad: Literal["sum", "mean"] = "sum"
    taps: tuple[str, ...] = ()
    views: Literal["shared", "per_peer"] = "shared"
    mix: Literal["shared", "per_view"] = "shared"
    peer_targets: Literal["own", "rerun", "components"] = "own"
    mixing: bool = True
    sampler: Sampler = field(default_factory=Sampler)
    ema_decay: float | None = None
    ema_warmup: Literal["none", "meanteacher"] = "none"
    ema_train_mode: bool = False
    teacher: str | None = None
    teacher_peer: int = 0
    teacher_model: str | None = None
    unused_params: bool = False
    host_views: int | None = None


@dataclass
class DataInfo:
    """Facts about the training data a method may size its state from (memory banks, stored predictions)."""

    num_classes: int
    train_size: int
    train_labels: Tensor  # (N,) int64, on the CPU
    in_channels: int
    image_size: tuple[int, int]
    crop_padding: int = 4  # the dataset's standard random-crop padding (Fashion-MNIST 2, CIFAR 4)


@dataclass
class StepRecord:
    """Everything the engine computed in one training step, handed to ``Method.losses``.

    ``outputs[i]`` is peer i's output (with gradient) on ``views[i]``; ``extra[name][i]`` its output on
    the extra input ``extra_views[name][i]`` (``None`` where peer i skipped it); ``ema`` / ``teacher`` are
    no-grad outputs of the EMA copy and the frozen teacher on the same peer views (``teacher_extra`` on
    the extra inputs).
    """

    views: list[View]
    outputs: list[PeerOutput]
    heads: list[nn.Linear]
    num_classes: int
    extra: dict[str, list[PeerOutput | None]] = field(default_factory=dict)
    ema: list[PeerOutput] | None = None
    teacher: list[PeerOutput] | None = None
    teacher_extra: dict[str, list[PeerOutput | None]] = field(default_factory=dict)
    extra_views: dict[str, list[View | None]] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0  # global step
    steps_per_epoch: int = 1
    total_epochs: int = 1
    lr: float = 0.0  # the optimizer's learning rate at this step
    weight_decay: float = 0.0  # the config's weight decay (for methods that take virtual SGD steps)

    @property
    def labels(self) -> Tensor:
        """(B,) labels of peer 0's view (every peer's, unless a method composes its views otherwise)."""
        return self.views[0].labels

    @property
    def index(self) -> Tensor:
        """(B,) dataset indices of peer 0's view."""
        return self.views[0].index

    @property
    def progress(self) -> float:
        """Training progress in [0, 1]."""
        return min(self.step / max(self.steps_per_epoch * self.total_epochs, 1), 1.0)

    def ce(self, logits: Tensor, view: int = 0, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy against the labels of peer ``view``'s input, mixed as its pixels were (and
        optionally smoothed)."""
        v = self.views[view]
        if v.mix is None:
            return cross_entropy(logits, v.labels, label_smoothing)
        q = v.soft_targets(self.num_classes)
        return soft_ce(logits, q * (1.0 - label_smoothing) + label_smoothing / self.num_classes)

    def peer_target(self, j: int, i: int, temperature: float = 1.0) -> Tensor:
        """(B, K) peer j's softened prediction (no gradient) for the image peer i saw (``needs.peer_targets``)."""
        if RERUN.format(i) in self.extra and j != i:
            logits = self.extra[RERUN.format(i)][j].logits
        elif UNMIXED in self.extra:
            p = F.softmax(f32(self.extra[UNMIXED][j].logits.detach()) / temperature, dim=1)
            mix = self.views[i].mix
            return p if mix is None else mix.mix(p)
        else:
            logits = self.outputs[j].logits
        return F.softmax(f32(logits.detach()) / temperature, dim=1)


@dataclass
class ParamGroup:
    """Parameters a method wants treated apart from the engine's default optimizer group.

    Attributes:
        params: the parameters.
        weight_decay: their weight decay (``None``: the config's), e.g. FFL's fusion module (1e-5).
        optimized: ``False`` keeps them out of the engine's optimizer: the method updates them itself
            (L-MCL's meta-learned weight network has its own optimizer).
    """

    params: list[nn.Parameter]
    weight_decay: float | None = None
    optimized: bool = True


@dataclass
class PreTrainContext:
    """What ``Method.before_training`` gets (DESIGN §3h).

    Attributes:
        cohort: the peers.
        ema: the EMA copy's module (the temporal-mean / independent teacher), or ``None``.
        batches: ``batches()`` yields training batches made into this method's views, from a generator
            seeded by the run's seed (the same on every call, independent of the epoch draws).
        sgd_optimizer: ``sgd_optimizer(params, lr, momentum=0.0)`` -> SGD (whatever ``optim.name`` trains
            with) with the config's weight decay.
        base_lr: the config's learning rate.
        autocast: the run's autocast context.
        taps: the stage maps every forward carries.
        scaler: a fresh gradient scaler for the run's precision (active under fp16 only, where unscaled
            gradients underflow; a no-op otherwise): ``scaler.scale(loss).backward()``,
            ``scaler.step(opt)``, ``scaler.update()``.
    """

    cohort: nn.Module
    ema: nn.Module | None
    batches: Callable[[], Iterator[Views]]
    sgd_optimizer: Callable[..., torch.optim.Optimizer]
    base_lr: float
    autocast: Callable[[], contextlib.AbstractContextManager[object]]
    taps: tuple[str, ...] = ()
    scaler: Callable[[], torch.amp.GradScaler] = lambda: torch.amp.GradScaler("cpu", enabled=False)


@dataclass
class FeatureHead:
    """Pooled features and the classifier that maps them to logits, for feature-level add-ons.

    ``halves=True``: the rows are two views of the same images ``[x_1; x_2]`` and an add-on pairs the
    first half with the second (DDGSD + SD-Dropout) instead of drawing two samples of every row.
    """

    feature: Tensor  # (R, D)
    head: nn.Linear
    halves: bool = False


METHODS: Registry[Method] = Registry("method")


class Method(nn.Module):
    """Base class of every distillation method. Subclasses set ``needs`` in ``__init__``."""

    needs: Needs

    def __init__(self) -> None:
        super().__init__()
        self.needs = Needs()

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        """Called once the cohort exists: build projectors, gates, banks sized from it and the data."""

    def make_views(self, batch: Batch, ctx: ViewContext) -> Views:
        """Views from ``needs``: one shared or one per peer, mixed by a shared or a per-view draw."""
        n, needs = ctx.n_peers, self.needs
        base = View(ctx.augment(batch.images), batch.labels, batch.index)
        views = [base] + [View(ctx.augment(batch.images), batch.labels, batch.index) if needs.views == "per_peer"
                          else base for _ in range(n - 1)]
        if ctx.mixer is None:
            return Views(views)
        if needs.mix == "shared":
            rec = ctx.mixer.draw(base.x, ctx.gen, ctx)
            if rec is None:
                return Views(views)
            mixed: dict[int, View] = {}
            return Views([mixed.setdefault(id(v), View(rec.mix_images(v.x), v.labels, v.index, rec)) for v in views])
        unmixed, views = views, [ctx.mixed(v) for v in views]
        extra: dict[str, Extra] = {}
        if needs.peer_targets == "rerun":
            extra = {RERUN.format(i): Extra([views[i] if j != i else None for j in range(n)]) for i in range(n)}
        elif needs.peer_targets == "components":
            extra = {UNMIXED: Extra(unmixed)}
        return Views(views, extra)

    def before_training(self, ctx: PreTrainContext) -> None:
        """Work before the first epoch (default: none). Its result must live in checkpointed state."""

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, rec: StepRecord) -> None:
        """State update after the optimizer step (default: none)."""

    def param_groups(self) -> list[ParamGroup]:
        """Parameters with their own weight decay or optimizer (default: none; all in one group)."""
        return []

    def feature_heads(self, rec: StepRecord) -> list[FeatureHead]:
        """The features an add-on acts on: by default each peer's pooled embedding and its classifier."""
        return [FeatureHead(o.embedding, head) for o, head in zip(rec.outputs, rec.heads)]

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        """Logits of every evaluated head: each peer, the peers' ensemble, and any EMA peers."""
        heads = {f"peer{i}": o.logits for i, o in enumerate(outputs)}
        if len(outputs) > 1:
            heads["ensemble"] = ensemble_log_probs([o.logits for o in outputs])
        for i, o in enumerate(ema or []):
            heads[f"ema{i}"] = o.logits
        return heads


ADDONS: Registry[AddOn] = Registry("addon")


class AddOn(nn.Module):
    """A loss term composed with any method by config (``addon=sd_dropout addon.lam=0.1``).

    It reads the features the method defines (``method.feature_heads(rec)``), so one add-on works
    with every method without a copy of each method "with" it. ``unused_params``: as
    :attr:`Needs.unused_params`, for the add-on's own parameters.
    """

    unused_params: bool = False

    def setup(self, method: Method, cohort: nn.Module, data: DataInfo) -> None:
        """Called after the method's own ``setup``."""

    def param_groups(self) -> list[ParamGroup]:
        """As :meth:`Method.param_groups`."""
        return []

    def losses(self, rec: StepRecord, method: Method) -> dict[str, Tensor]:
        raise NotImplementedError


def all_ranks(*tensors: Tensor, dim: int = 0) -> list[Tensor]:
    """Each tensor concatenated along ``dim`` over the torchrun processes (itself in one process), for
    method state every rank must hold alike (memory banks, stored predictions)."""
    return all_gather_cat(*tensors, dim=dim)
