"""Process-group set-up for ``torchrun``: DDP over the whole cohort + method, rank-0 side effects.

Teardown order matters for gloo. Its backend stops its worker threads and its TCP loop thread only when
the last reference to it goes, and destroying the process group does not stop them while anything still
holds one. Two things did: the DDP wrapper (until the trainer is collected, possibly only at interpreter
exit), and ``torch.distributed.nn``, which DDP imports on first use and whose functions bind the default
group as a default argument when imported after ``init_process_group``. The threads then ran into
interpreter shutdown, and tearing them down there raced with the peer process closing its connections: an
occasional ``terminate called without an active exception`` after the last epoch, more likely on a loaded
machine. So :func:`setup` imports ``torch.distributed.nn`` before initialising, and :func:`teardown`
releases every DDP wrapper and collects before destroying the group, while all processes are in step.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ..collectives import all_reduce_mean
from .precision import resolve_device


@dataclass
class DistInfo:
    """This process's place in the job (world_size 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """DDP-wrap the step module when running in several processes. ``find_unused``: some trainable
        parameters may get no gradient in a step (``Needs.unused_params``), so DDP must look for them in
        the autograd graph after every forward, a cost every other method is spared."""
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        # A method's buffers (memory banks, stored per-sample predictions) are its own business: it keeps
        # them identical across ranks itself (gathering what it writes), so DDP does not re-send them
        # from rank 0 at every step; BatchNorm statistics are broadcast as usual.
        method = getattr(module, "method", None)
        if method is not None:
            ignore = [f"method.{name}" for name, _ in method.named_buffers()]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def broadcast(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (after work each rank did on its own shard)."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                tdist.broadcast(t.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's (small, picklable) ``obj`` in rank order, on every rank (``[obj]`` in one process)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (one all-reduce on a CPU copy under gloo; identity in one process)."""
        if self.world_size == 1:
            return t
        out = t.to(self.device) if self.device.type == "cuda" else t.cpu()
        tdist.all_reduce(out)
        return out

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Average scalar tensors over the processes (one all-reduce; identity in one process)."""
        if self.world_size == 1 or not values:
            return values
        return dict(zip(values, all_reduce_mean(torch.stack([v.float() for v in values.values()]))))


def teardown() -> None:
    """Destroy the process group, if this process started one, after collecting what may still hold it (the
    caller drops its DDP wrappers first, e.g. :meth:`~peerdistill.engine.trainer.Trainer.release`): the
    gloo backend's threads are joined here, not at interpreter exit (see the module docstring)."""
    if tdist.is_available() and tdist.is_initialized():
        gc.collect()  # the trainer sits in reference cycles: free its DDP wrapper now
        tdist.destroy_process_group()


def setup(device: str, timeout_s: float = 3600) -> DistInfo:
    """Initialise the process group from torchrun's environment variables (no-op otherwise).

    ``timeout_s`` bounds every collective, the barrier where the other ranks wait while rank 0 evaluates
    and checkpoints included (NCCL's own default, 10 minutes, is shorter than an evaluation can be).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        import torch.distributed.nn  # noqa: F401  before init: its defaults must not hold the group
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local, world, dev)
