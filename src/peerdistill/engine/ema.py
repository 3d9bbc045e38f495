"""Exponential moving average ("temporal mean") copies of a module."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A no-grad copy updated as ``theta' <- a * theta' + (1 - a) * theta`` after each step.

    Args:
        source: the module to average.
        decay: the decay ``a`` (0.999 in PCL / DKEL).
        warmup: ``"none"``: fixed ``a`` from step 0; ``"meanteacher"``: ``a_t = min(1 - 1/(t + 1), a)``
            with t counted from 0, as in the PCL/DKEL code (so the first update copies the source).
        buffers: ``"copy"`` BN running statistics from the source, or keep them ``"own"`` (updated by the
            copy's own train-mode forwards, as PCL/DKEL's mean network does).
    """

    def __init__(self, source: nn.Module, decay: float, warmup: str = "none", buffers: str = "copy") -> None:
        super().__init__()
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)
        self.decay, self.warmup, self.buffers = decay, warmup, buffers
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def decay_at(self, t: int) -> float:
        return min(1.0 - 1.0 / (t + 1), self.decay) if self.warmup == "meanteacher" else self.decay

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        a = self.decay_at(int(self.updates))
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - a)
        if self.buffers == "copy":
            for b_ema, b_src in zip(self.module.buffers(), source.buffers()):
                b_ema.copy_(b_src)
        self.updates += 1

    def forward(self, *args: object, **kwargs: object) -> object:
        with torch.no_grad():
            return self.module(*args, **kwargs)
