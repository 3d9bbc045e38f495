"""Batch composition a method can ask for (DESIGN §3g): random, m samples per class, same-class pairs.

A sampler turns an epoch number into the epoch's **global** batches: an index matrix
``(n_batches, rows)`` with ``rows = rows_per_sample * global_batch``. Under torchrun, rank r trains on
the columns ``r::world_size`` of every row, so a sampler arranges its columns such that each rank's slice
is itself a well-formed batch (whole same-class groups, anchors before partners), and such that the row
itself does not depend on the number of processes: a multi-process global batch is the one-process batch.
Every draw comes from a generator seeded by ``(seed, epoch)``: an epoch is reproducible on its own, so
``--resume`` replays it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import PeerdistillError


class Sampler:
    """Random batches: a fresh permutation of the training set each epoch (the default)."""

    rows_per_sample = 1  # rows a batch holds per sample of ``batch_size`` (pairs: anchor + partner)

    def epoch(self, labels: np.ndarray, batch_size: int, world: int, seed: int, epoch: int) -> Tensor:
        """(n_batches, rows_per_sample * batch_size) global dataset indices of one epoch.

        Args:
            labels: (N,) training labels.
            batch_size: global batch size (samples, not rows).
            world: number of processes; each rank takes columns ``rank::world``.
            seed, epoch: the draw is a function of these alone.
        """
        n = len(labels)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        nb = n // batch_size
        return order[: nb * batch_size].view(nb, batch_size)

    def check(self, labels: np.ndarray, batch_size: int, world: int) -> None:
        """Raise a one-line error if this data and batch size cannot give well-formed batches."""
        if len(labels) < batch_size:
            raise PeerdistillError(f"batch_size {batch_size} is larger than the {len(labels)} training samples")

    def describe(self) -> str:
        return "random"


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x5A3])


class MPerClassSampler(Sampler):
    """Batches of ``batch_size / m`` groups of ``m`` same-class samples (MCL's ``MPerClassSampler``, m = 2).

    Each epoch every class's samples are shuffled and cut into groups of m (a class whose count is not a
    multiple of m completes its last group with randomly re-drawn samples of the same class), and the
    groups are packed into batches so that no class holds more than ``ceil(groups per batch / classes)``
    groups of a batch: with at least as many classes as groups per batch (CIFAR-100: 64 groups of 2)
    every class in a batch has exactly m samples; with fewer classes (Fashion-MNIST) each class's count
    is a multiple of m. With balanced classes every sample appears exactly once per epoch, apart from
    those completing groups and the last incomplete batch, which is dropped as for random batches.

    ``per_batch=True`` is the MCL code's sampler instead: every batch draws its classes afresh (a random
    order of the classes, cycled when there are fewer classes than groups) and ``m`` images of each at
    random (without replacement while the class has enough), for ``N // batch_size`` batches an epoch
    (the code's ``length_before_new_iter`` is the dataset size). The batch make-up is the same; an epoch
    then shows some images several times and others not at all.
    """

    def __init__(self, m: int = 2, per_batch: bool = False) -> None:
        self.m, self.per_batch = m, per_batch

    def check(self, labels: np.ndarray, batch_size: int, world: int) -> None:
        super().check(labels, batch_size, world)
        if batch_size % (self.m * world):
            raise PeerdistillError(f"m-per-class batches need batch_size divisible by m x processes = "
                                   f"{self.m} x {world}; got {batch_size}")
        small = np.bincount(labels)[np.bincount(labels) > 0].min()
        if small < self.m:
            raise PeerdistillError(f"m-per-class batches need at least m = {self.m} samples of every class; "
                                   f"one class has {small}")

    def describe(self) -> str:
        return f"{self.m} per class" + (", drawn per batch" if self.per_batch else "")

    def epoch(self, labels: np.ndarray, batch_size: int, world: int, seed: int, epoch: int) -> Tensor:
        if self.per_batch:
            return self._drawn(labels, batch_size, world, _rng(seed, epoch))
        rng, m = _rng(seed, epoch), self.m
        groups: list[np.ndarray] = []  # per class: (n_c, m) shuffled groups
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            pad = (-len(idx)) % m
            if pad:  # complete the last group with other samples of the class (check() ensures >= m)
                idx = np.concatenate([idx, rng.choice(idx[: len(idx) - len(idx) % m], pad, replace=False)])
            groups.append(idx.reshape(-1, m))
        per_batch = batch_size // m
        cap = math.ceil(per_batch / len(groups))
        left = np.array([len(g) for g in groups])
        rows = []
        while left.sum() >= per_batch:
            # Classes with the most groups left first (random among equals): the greedy rule that never
            # strands groups when the classes are balanced, so the epoch covers every sample.
            order = np.lexsort((rng.random(len(left)), -left))
            take: list[np.ndarray] = []
            for c in order:
                k = min(cap, int(left[c]), per_batch - len(take))
                take.extend(groups[c][len(groups[c]) - left[c]:len(groups[c]) - left[c] + k])
                left[c] -= k
                if len(take) == per_batch:
                    break
            if len(take) < per_batch:
                break
            rows.append(_layout(np.stack(take)[rng.permutation(per_batch)]))
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, batch_size, dtype=torch.long)

    def _drawn(self, labels: np.ndarray, batch_size: int, world: int, rng: np.random.Generator) -> Tensor:
        """``N // batch_size`` batches, each of freshly drawn classes and images (the code's sampler)."""
        classes, m, per_batch = np.unique(labels), self.m, batch_size // self.m
        members = {c: np.flatnonzero(labels == c) for c in classes}
        rows = []
        for _ in range(len(labels) // batch_size):
            picked, counts = np.unique(np.resize(rng.permutation(classes), per_batch), return_counts=True)
            groups = [rng.choice(members[c], k * m, replace=len(members[c]) < k * m).reshape(k, m)
                      for c, k in zip(picked, counts)]
            rows.append(_layout(np.concatenate(groups)[rng.permutation(per_batch)]))
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, batch_size, dtype=torch.long)


def _layout(groups: np.ndarray) -> np.ndarray:
    """(G, m) groups -> one global batch row, member-major: group k's members sit at columns k, k + G, ...

    The row does not depend on the number of processes W: for any W dividing G (``check``), the columns
    ``r::W`` hold whole groups (those with k = r mod W), so rank r's slice is a well-formed batch, and the
    global batch -- with every per-image draw made for it (crops, flips, bank negatives) -- is the
    one-process batch in the one-process order."""
    return groups.T.reshape(-1)


class PairSampler(Sampler):
    """Anchors in random order, each followed (in the second half of the batch) by a random sample of
    its own class, which may be the anchor itself (CS-KD's ``PairBatchSampler``). A batch holds
    ``2 * batch_size`` rows: anchors first, partners after; each anchor appears once per epoch."""

    rows_per_sample = 2

    def describe(self) -> str:
        return "anchor + same-class partner"

    def epoch(self, labels: np.ndarray, batch_size: int, world: int, seed: int, epoch: int) -> Tensor:
        anchors = super().epoch(labels, batch_size, world, seed, epoch)  # (nb, B), the random order
        rng = _rng(seed, epoch)
        by_class = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=int(labels.max()) + 1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        a = anchors.numpy()
        c = labels[a]
        pick = starts[c] + np.floor(rng.random(a.shape) * counts[c]).astype(np.int64)
        partners = torch.from_numpy(by_class[pick])
        return torch.cat([anchors, partners], dim=1)  # columns r::world: rank r's anchors, then partners
