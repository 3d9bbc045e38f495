"""Worker processes that decode and crop, and the uint8 batches they hand to the training process.

:class:`StreamLoader` wraps torch's ``DataLoader`` around a :class:`StreamDataset`. The batches are the
rows of an index matrix given per epoch -- a sampler's epoch matrix (this rank's columns), or
:func:`sequential_rows` for evaluation -- so every sampler of :mod:`peerdistill.data.samplers` works
unchanged. A worker builds a whole batch at once into one uint8 ``(B, V, H, W, C)`` tensor (no per-sample
tensors, no collate copy); its ``images`` are the ``(B, V, C, H, W)`` view of that storage, i.e.
channels-last. Every crop is a function of ``(seed, epoch, sample index, view)``, so 0, 1 or 8 workers
give the same batches.

A sample that cannot be read or decoded does not kill a worker with a traceback: the worker returns the
batch with an error message naming the file, and the loader raises it as one :class:`PeerdistillError`
line in the training process (a corrupt file stops the run; the last checkpoint keeps the finished work).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ...errors import PeerdistillError
from .codec import DecodeError
from .sets import LazySet
from .transform import HostTransform, empty_views


@dataclass
class HostBatch:
    """A batch decoded on the host.

    Attributes:
        pixels: uint8 ``(B, V, H, W, C)``, contiguous.
        labels: int64 ``(B,)``.
        index: int64 ``(B,)``, the samples' indices in the dataset.
        error: Why the batch could not be made (the loader raises it), else None.
    """

    pixels: Tensor
    labels: Tensor
    index: Tensor
    error: str | None = None

    @property
    def images(self) -> Tensor:
        """uint8 ``(B, V, C, H, W)``: a view of ``pixels`` (channels-last strides)."""
        return self.pixels.permute(0, 1, 4, 2, 3)

    def pin_memory(self) -> HostBatch:
        """The batch in page-locked memory (the DataLoader's pin thread calls this on CUDA)."""
        return HostBatch(self.pixels.pin_memory(), self.labels.pin_memory(), self.index.pin_memory(), self.error)

    def to(self, device: torch.device | str) -> HostBatch:
        """Copy to ``device``; asynchronous from pinned memory."""
        nb = self.pixels.is_pinned()
        return HostBatch(self.pixels.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb),
                         self.index.to(device, non_blocking=nb), self.error)


class StreamDataset(Dataset):
    """A lazy set and the host transform: ``__getitems__([(epoch, index), ...])`` gives a :class:`HostBatch`."""

    def __init__(self, samples: LazySet, transform: HostTransform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> HostBatch:
        return self.__getitems__([key])

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> HostBatch:
        index = torch.tensor([i for _, i in keys], dtype=torch.int64)
        labels = torch.from_numpy(self.samples.labels[index.numpy()])
        pixels = empty_views(len(keys), self.transform)
        rows = pixels.numpy()  # the transform writes each sample into its numpy row
        for row, (epoch, i) in enumerate(keys):
            error = self._one(epoch, i, rows[row])
            if error:
                return HostBatch(pixels[:0], labels[:0], index[:0], error)
        return HostBatch(pixels, labels, index)

    def _one(self, epoch: int, i: int, out: np.ndarray) -> str | None:
        try:
            data = self.samples.read(i)
        except OSError as e:
            return f"cannot read {self.samples.describe(i)} (sample {i}): {e.strerror or e}"
        try:
            self.transform.apply(data, epoch, i, out)
        except DecodeError as e:
            return f"cannot decode image {self.samples.describe(i)} (sample {i}): {e}"
        return None


class _Rows:
    """The batch sampler: this epoch's rows as lists of ``(epoch, index)``."""

    def __init__(self) -> None:
        self.rows: Sequence[Sequence[int]] = []
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for row in self.rows:
            yield [(self.epoch, i) for i in (row.tolist() if hasattr(row, "tolist") else row)]


def _unwrap(batch: HostBatch) -> HostBatch:
    return batch  # the dataset already built the batch


class StreamLoader:
    """Batches of a :class:`StreamDataset` in the order of given index rows.

    Args:
        dataset: The samples and their transform.
        workers: Worker processes (0: decode in this process).
        pin_memory: Page-locked batches, for asynchronous copies to a CUDA device.
        prefetch: Batches each worker prepares ahead.
        persistent: Keep the workers between epochs (they start once per run, not per epoch).
    """

    def __init__(self, dataset: StreamDataset, workers: int = 0, pin_memory: bool = False, prefetch: int = 2,
                 persistent: bool = True) -> None:
        self.dataset = dataset
        self._rows = _Rows()
        extra = {"prefetch_factor": prefetch, "persistent_workers": persistent} if workers else {}
        self._loader = DataLoader(dataset, batch_sampler=self._rows, num_workers=workers,
                                  collate_fn=_unwrap, pin_memory=pin_memory, **extra)

    def batches(self, rows: Tensor | np.ndarray | Sequence[Sequence[int]], epoch: int = 0) -> Iterator[HostBatch]:
        """Yield one :class:`HostBatch` per row of ``rows`` (dataset indices), drawn for ``epoch``.

        Raises:
            PeerdistillError: a sample could not be read or decoded (the message names it).
        """
        self._rows.rows, self._rows.epoch = rows, epoch
        for batch in self._loader:
            if batch.error:
                raise PeerdistillError(batch.error)
            yield batch


def sequential_rows(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """Evaluation batches: rank ``rank``'s contiguous share of ``0 .. n-1`` cut into ``batch_size`` rows
    (the last one shorter); the shares of all ranks cover every sample exactly once."""
    share = np.array_split(np.arange(n, dtype=np.int64), world)[rank]
    return [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
