"""The method contract (DESIGN §3): the engine computes, a method turns outputs into losses.

A method is an ``nn.Module`` (its own parameters and buffers join the optimizer and checkpoint) that
declares :class:`Needs` and implements a few hooks:

* ``make_views(batch, augment, mixer, gen)`` -> one input per peer plus the mix record;
* ``losses(rec)`` -> named, already-weighted loss terms (the engine sums them);
* ``update(rec)`` -> state changes after the optimizer step (memory banks, ...);
* ``eval_heads(out)`` -> the logits of every evaluated head.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..data.loader import Batch
from ..data.mix import Mixer, MixRecord
from ..registry import Registry
from .functional import cross_entropy, ensemble_log_probs, soft_ce


@dataclass
class Needs:
    """What a method asks of the engine.

    Attributes:
        peers: number of networks; ``None`` takes the config's ``peers``.
        min_peers: smallest cohort the method makes sense for.
        topology: ``"independent"`` networks or ``"branched"`` (a shared trunk plus per-peer branches).
        split_after: for branched cohorts, the last shared stage (``None``: all stages but the last).
        taps: stage names whose maps each peer output must carry (``"*"`` = every stage).
        ema_decay: keep an EMA copy of the cohort with this decay (``None``: no EMA copy).
        ema_warmup: ``"none"`` (fixed decay) or ``"meanteacher"`` (decay_t = min(1 - 1/(t+1), decay)).
        ema_train_mode: run the EMA copy in train mode (BN batch statistics), as PCL/DKEL do.
        teacher: path of a run directory or checkpoint whose peer is loaded frozen as the teacher.
        teacher_peer: which peer of that checkpoint is the teacher.
        teacher_model: if set, the teacher checkpoint must be this architecture.
    """

    peers: int | None = None
    min_peers: int = 1
    topology: str = "independent"
    split_after: str | None = None
    taps: tuple[str, ...] = ()
    ema_decay: float | None = None
    ema_warmup: str = "none"
    ema_train_mode: bool = False
    teacher: str | None = None
    teacher_peer: int = 0
    teacher_model: str | None = None


@dataclass
class PeerOutput:
    """One network's outputs for one input: logits (B, K), pooled embedding (B, D), requested maps."""

    logits: Tensor
    embedding: Tensor
    maps: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepRecord:
    """Everything the engine computed in one training step, handed to ``Method.losses``."""

    labels: Tensor  # (B,) labels of the unmixed batch
    index: Tensor  # (B,) dataset indices
    views: list[Tensor]  # the input each peer saw
    outputs: list[PeerOutput]  # one per peer, with gradient
    heads: list[nn.Linear]  # each peer's classifier
    num_classes: int
    mix: MixRecord | None = None
    ema: list[PeerOutput] | None = None  # EMA copy's outputs on the same views, no gradient
    teacher: list[PeerOutput] | None = None  # frozen teacher's outputs on the same views
    epoch: int = 0
    step: int = 0  # global step
    steps_per_epoch: int = 1
    total_epochs: int = 1

    @property
    def progress(self) -> float:
        """Training progress in [0, 1]."""
        return min(self.step / max(self.steps_per_epoch * self.total_epochs, 1), 1.0)

    @property
    def epoch_float(self) -> float:
        """Fractional epoch, for ramp-ups defined in epochs."""
        return self.step / max(self.steps_per_epoch, 1)

    def ce(self, logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy against the (possibly mixed, optionally smoothed) labels of this batch."""
        if self.mix is None:
            return cross_entropy(logits, self.labels, label_smoothing)
        q = self.mix.soft_targets(self.labels, self.num_classes)
        return soft_ce(logits, q * (1.0 - label_smoothing) + label_smoothing / self.num_classes)


METHODS: Registry[Method] = Registry("method")


class Method(nn.Module):
    """Base class of every distillation method. Subclasses set ``needs`` in ``__init__``."""

    needs: Needs

    def __init__(self) -> None:
        super().__init__()
        self.needs = Needs()

    def setup(self, cohort: nn.Module, num_classes: int) -> None:
        """Called once the cohort exists: build projectors, gates, banks sized from it."""

    def make_views(self, batch: Batch, augment: Callable[[Tensor], Tensor], mixer: Mixer | None,
                   n_peers: int, gen: torch.Generator) -> tuple[list[Tensor], MixRecord | None]:
        """Default: one augmented (and optionally mixed) view shared by every peer."""
        x = augment(batch.images)
        rec = None
        if mixer is not None:
            x, rec = mixer(x, gen)
        return [x] * n_peers, rec

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, rec: StepRecord) -> None:
        """State update after the optimizer step (default: none)."""

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        """Logits of every evaluated head: each peer, the peers' ensemble, and any EMA peers."""
        heads = {f"peer{i}": o.logits for i, o in enumerate(outputs)}
        if len(outputs) > 1:
            heads["ensemble"] = ensemble_log_probs([o.logits for o in outputs])
        for i, o in enumerate(ema or []):
            heads[f"ema{i}"] = o.logits
        return heads
