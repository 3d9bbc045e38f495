"""The per-step method work shared by the engine's :class:`~peerdistill.engine.trainer.Trainer` and the
own-loop :class:`~peerdistill.api.Distiller`: the peers' outputs on a step's views, the frozen copies'
outputs (EMA, teacher), and the method's and add-ons' loss terms. One implementation, so the two cannot
drift apart."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.views import View, Views
from ..errors import PeerdistillError
from ..methods.base import AddOn, Method, PeerOutput, StepRecord


def peer_outputs(cohort: nn.Module, views: Views, taps: tuple[str, ...]
                 ) -> tuple[list[PeerOutput], dict[str, list[PeerOutput | None]]]:
    """Every peer on its view (with gradient) and on each extra input (with gradient if it asks)."""
    outputs = cohort([v.x for v in views.peers], taps)
    extra = {}
    for name, ex in views.extra.items():
        with torch.set_grad_enabled(ex.grad and torch.is_grad_enabled()):
            extra[name] = cohort([v.x if v is not None else None for v in ex.views], taps)
    return outputs, extra


def ema_outputs(ema: nn.Module, views: list[View], taps: tuple[str, ...], train_mode: bool) -> list[PeerOutput]:
    """The EMA copy on the peer views, without gradient, in train mode (own BN batch statistics) if asked."""
    with torch.no_grad():
        ema.train(train_mode)
        return ema([v.x for v in views], taps)


def teacher_outputs(teacher: nn.Module, views: Views) -> tuple[list[PeerOutput], dict[str, list[PeerOutput | None]]]:
    """The frozen teacher's outputs on every peer view and extra input, once per distinct tensor."""
    with torch.no_grad():
        done = {id(x): teacher([x])[0] for x in views.tensors()}
    extra = {name: [done[id(v.x)] if v is not None else None for v in ex.views] for name, ex in views.extra.items()}
    return [done[id(v.x)] for v in views.peers], extra


def loss_terms(method: Method, addons: Sequence[AddOn], rec: StepRecord) -> dict[str, Tensor]:
    """The method's named terms and every add-on's (a name used twice is refused)."""
    terms = method.losses(rec)
    for addon in addons:
        more = addon.losses(rec, method)
        if set(more) & set(terms):
            raise PeerdistillError(f"add-on term {sorted(set(more) & set(terms))[0]!r} has the name of a "
                                   f"term of method {type(method).__name__}: rename one of them")
        terms.update(more)
    return terms
