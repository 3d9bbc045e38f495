"""The heads a method evaluates, computed on one batch: what validation, test and every robustness
evaluation score (one definition, so a head means the same thing everywhere)."""
from __future__ import annotations

from torch import Tensor, nn

from ..methods.base import Method


def evaluated_heads(cohort: nn.Module, ema: nn.Module | None, method: Method, x: Tensor,
                    taps: tuple[str, ...]) -> dict[str, Tensor]:
    """Every head's (B, K) output for the normalised batch ``x``: each peer (and the EMA copy, if the method
    keeps one) on ``x``, then the method's :meth:`~peerdistill.methods.base.Method.eval_heads`."""
    n = len(cohort)
    outs = cohort([x] * n, taps)
    ema_outs = ema([x] * n, taps) if ema is not None else None
    return method.eval_heads(outs, ema_outs)
