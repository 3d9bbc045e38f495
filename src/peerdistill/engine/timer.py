"""Optional per-phase step timing for ``peerdistill bench`` (a no-op during normal training)."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseTimer:
    """``with timer("forward"): ...`` accumulates wall time per phase when enabled.

    Enabled timing synchronises the device at phase boundaries, which is what makes the breakdown
    meaningful on a GPU; disabled, it costs one attribute check.
    """

    def __init__(self, enabled: bool = False, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.totals[phase] += time.perf_counter() - t0

    def reset(self) -> None:
        self.totals.clear()
