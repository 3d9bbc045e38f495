"""Host-side random draws and their trip to the device, without stalling a GPU (DESIGN §7).

Every random decision of the data pipeline is drawn on a CPU generator (identical draws on any device, and
for every DDP rank). The few that steer Python control flow -- whether a batch is mixed, a Beta draw, a
CutMix box -- are read with :func:`host_values`, which refuses device tensors, so reading them never waits
for the GPU. Per-sample draws go to the device with :func:`to_device`: from pinned memory and
``non_blocking`` on CUDA, so the copy is queued behind the running step instead of synchronising with it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def host_values(t: Tensor) -> Any:
    """The Python value(s) of a tensor that lives on the host (a CPU-generator draw)."""
    if t.device.type != "cpu":
        raise ValueError(f"host_values reads host tensors only; got one on {t.device}")
    return t.tolist()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Move a host tensor to ``device``; on CUDA through pinned memory without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
