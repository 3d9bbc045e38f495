"""The one formula that derives a random stream from the run's seed.

Training draws its augmentation of epoch ``e`` from ``seed_stream(seed, e)``; a tool that must repeat
training's draws (the T. stddev driver) or keep apart from them (the before-training hook, an
evaluation's attacks) derives its stream here too, so the streams stay equal or apart by construction.
"""
from __future__ import annotations


def seed_stream(seed: int, index: int = 0, *offsets: int) -> int:
    """``seed * 1_000_003 + index * 7919 + sum(offsets)``: the generator seed of stream ``index`` (an epoch
    or a step) of the run seeded ``seed``; ``offsets`` name a sub-stream (a rank, an augmentation)."""
    return seed * 1_000_003 + index * 7919 + sum(offsets)
