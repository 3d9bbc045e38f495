"""Random-number state in checkpoints: each process's own CPU generator and training-device generator.

Rank 0 writes the checkpoint, so the states of every rank are gathered into it (``per_rank``); on resume
each rank restores its own entry, and only for its own device: a run resumed on a machine with fewer
visible GPUs, or by a different number of processes, still loads.
"""
from __future__ import annotations

from typing import Any

import torch


def capture(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's CPU generator state and, on CUDA, its training device's."""
    return {"cpu": torch.get_rng_state(),
            "device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore(rng: dict[str, Any], rank: int, device: torch.device) -> None:
    """Restore this process's states from a checkpoint's ``rng`` entry.

    ``per_rank[rank]`` is what this rank saved; a rank the checkpoint did not have (more processes than
    before) takes rank 0's. Checkpoints written before the per-rank layout hold rank 0's CPU state
    (``torch``) and rank 0's process's state of every visible GPU (``cuda``): the entry of this device's
    index is used when there is one.
    """
    per_rank = rng.get("per_rank")
    if per_rank:
        own = per_rank[rank] if rank < len(per_rank) else per_rank[0]
        torch.set_rng_state(own["cpu"])
        if own.get("device") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(own["device"], device)
        return
    torch.set_rng_state(rng["torch"])
    states = rng.get("cuda") or []
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(states):
            torch.cuda.set_rng_state(states[index], device)
