"""Exponential moving average ("temporal mean") copies of a module."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA(nn.Module):
    """A no-grad copy updated as ``theta' <- a * theta' + (1 - a) * theta`` after each optimizer step.

    The copy is a ``deepcopy`` of the source made at construction, so it starts from the source's
    initial weights (DKEL: "the teacher starts as a copy of the student").

    Args:
        source: the module to average.
        decay: the decay ``a`` (0.999 in PCL / DKEL).
        warmup: ``"none"``: fixed ``a`` from the first update; ``"meanteacher"``: ``a_t = min(1 - 1/(t + 1), a)``
            with t the number of earlier updates (0 at the first), as the PCL/DKEL code counts its
            ``global_step`` (``update_ema_variables`` runs after the optimizer step, before the increment),
            so the first update copies the source. (The original mean-teacher code increments first, t = 1.)
        buffers: ``"copy"`` BN running statistics from the source, or keep them ``"own"`` (updated by the
            copy's own train-mode forwards, as PCL/DKEL's mean network does: their EMA averages
            ``parameters()`` only).
    """

    def __init__(self, source: nn.Module, decay: float, warmup: str = "none", buffers: str = "copy") -> None:
        super().__init__()
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)
        self.decay, self.warmup, self.buffer_mode = decay, warmup, buffers  # not `buffers`: nn.Module.buffers()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # Host-side mirror of ``updates``: reading the buffer every step would synchronise with the
        # device (DESIGN §7). ``None`` after a checkpoint load: read once at the next update.
        self._count: int | None = 0
        self.register_load_state_dict_post_hook(_forget_count)

    def decay_at(self, t: int) -> float:
        return min(1.0 - 1.0 / (t + 1), self.decay) if self.warmup == "meanteacher" else self.decay

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        t = int(self.updates) if self._count is None else self._count
        a = self.decay_at(t)
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - a)  # weight 1 (a = 0) copies the source exactly
        if self.buffer_mode == "copy":
            for b_ema, b_src in zip(self.module.buffers(), source.buffers()):
                b_ema.copy_(b_src)
        self.updates += 1
        self._count = t + 1

    def forward(self, *args: object, **kwargs: object) -> object:
        with torch.no_grad():
            return self.module(*args, **kwargs)


def _forget_count(module: EMA, _keys: Any) -> None:
    module._count = None
