"""The collectives across torchrun processes that methods and the engine share: each is the identity in
one process (no process group, or a group of one)."""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import Tensor


def world_size() -> int:
    """The number of processes of the initialised process group; 1 without one."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def all_reduce_mean(flat: Tensor) -> Tensor:
    """``flat`` averaged over the processes (one all-reduce; the caller flattens what it averages)."""
    n = world_size()
    if n == 1:
        return flat
    tdist.all_reduce(flat)
    return flat / n


def all_gather_cat(*tensors: Tensor, dim: int = 0) -> list[Tensor]:
    """Each tensor concatenated along ``dim`` over the processes, in rank order."""
    n = world_size()
    if n == 1:
        return list(tensors)
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(n)]
        tdist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts, dim))
    return out
