"""The collectives across torchrun processes that methods and the engine share: each is the identity in
one process (no process group, or a group of one)."""
from __future__ import annotations

from typing import Any

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


class _GatherRows(torch.autograd.Function):
    """All-gather along ``dim`` whose backward hands each rank the sum over ranks of the gradient of its
    own rows (an all-reduce of the full gradient, then this rank's slice: every backend has all-reduce,
    gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, dim: int) -> Tensor:
        world, rank = tdist.get_world_size(), tdist.get_rank()
        parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(world)]
        tdist.all_gather(parts, t.contiguous())
        ctx.dim, ctx.start, ctx.size = dim, rank * t.shape[dim], t.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad)
        return grad.narrow(ctx.dim, ctx.start, ctx.size), None


def global_batch(*tensors: Tensor, dim: int = 0) -> list[Tensor]:
    """Each tensor concatenated along its batch dimension ``dim`` over the torchrun processes, in rank order,
    with gradient (itself in one process): the whole global batch, for a loss term that is not a mean of
    per-sample terms (in-batch contrast, batch means, an ensemble fitted on the batch).

    Every rank then computes the same global term. Its backward gives each rank the sum over ranks of the
    gradient of that rank's rows, so the average DDP takes over the ranks is exactly the one-process
    gradient of the global term, while a per-sample mean over the local rows averaged by DDP is the
    global mean: the two kinds of terms add up as in one process. The rows come in rank order, not in the
    one-process order of the global batch, so the term must not depend on the order of the rows (masks
    by label, means, sums). Tensors without gradient are gathered plainly.
    """
    if world_size() == 1:
        return list(tensors)
    return [_GatherRows.apply(t, dim) if t.requires_grad else all_gather_cat(t, dim=dim)[0] for t in tensors]
