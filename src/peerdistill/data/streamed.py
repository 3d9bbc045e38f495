"""Streamed data behind the same ``Batch`` interface as device-resident data (DESIGN §4).

A source that reads image files returns :class:`StreamSplits` -- lazy listings, labels in memory -- when it
streams. :func:`stream_bundle` carves the validation split from the listing and wraps each split in a
:class:`StreamSet`; its :meth:`StreamSet.loader` has :class:`~.loader.DeviceLoader`'s interface (``len``,
``set_epoch``, iteration over :class:`~.loader.Batch`), so the trainer, every sampler and every method work
unchanged. Worker processes decode and crop (:mod:`.stream`); the uint8 batches reach the device through
pinned memory on CUDA; normalisation, mixers and per-view work stay the device code. A batch carries
``views``: ``(B, V, C, H, W)``, V independent crops of each image (one per peer for per-peer views).

The ``shards`` source (webdataset shards as ``peerdistill pack`` writes them) is registered here; the
``imagefolder`` source streams when asked for a lazy listing.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from ..errors import PeerdistillError
from ..params import Interval
from .base import DATASETS
from .loader import Batch, DataBundle, train_val_indices
from .samplers import Sampler
from .stream import HostTransform, LazySet, StreamDataset, StreamLoader, open_shards, sequential_rows

# torchvision's ImageNet statistics, with which most published weights were trained.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEMORY_SHARE = 0.5  # data.stream=auto streams when the decoded set would exceed this share of free memory


@dataclass
class StreamSplits:
    """A streaming source's result: lazy train and test listings plus what augmentation needs."""

    train: LazySet
    test: LazySet
    classes: list[str]
    channels: int = 3
    image_size: int = 224  # the source's default side (the config's data.image_size overrides it)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_padding: int = 0  # RandomResizedCrop on the host replaces the padded random crop
    flip: bool = True
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check(self, name: str) -> StreamSplits:
        for split, s in (("train", self.train), ("test", self.test)):
            if len(s) == 0:
                raise PeerdistillError(f"dataset {name!r}: the {split} split is empty")
            if int(s.labels.max()) >= self.num_classes:
                raise PeerdistillError(f"dataset {name!r}: {split} labels reach {int(s.labels.max())} "
                                       f"but there are {self.num_classes} classes")
        return self


def grey_stats(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> tuple[tuple, tuple]:
    """The statistics for ``channels`` (1: the mean of the RGB ones)."""
    return (mean, std) if channels == 3 else ((sum(mean) / 3,), (sum(std) / 3,))


def free_memory(device: torch.device) -> int:
    """Bytes free for a decoded set: the host's available memory, and the GPU's free memory on CUDA."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda":
        free = min(free, torch.cuda.mem_get_info(device)[0])
    return free


def decoded_bytes(splits: StreamSplits, image_size: int) -> int:
    """What the in-memory path would hold: every image of both splits as uint8 ``image_size``²."""
    return (len(splits.train) + len(splits.test)) * image_size * image_size * splits.channels


def should_stream(mode: bool | str, splits: StreamSplits, image_size: int, device: torch.device) -> bool:
    """``data.stream``: true/false as given; ``auto`` streams when the decoded set exceeds
    :data:`MEMORY_SHARE` of :func:`free_memory`."""
    if mode != "auto":
        return bool(mode)
    return decoded_bytes(splits, image_size) > MEMORY_SHARE * free_memory(device)


def default_workers(world_size: int, device: torch.device | str) -> int:
    """``data.workers`` when the config leaves it unset.

    On an accelerator: one worker per CPU core of this process's share, less one for the training loop, at
    least one. On the CPU the step's compute threads (``torch.get_num_threads()``) already occupy cores, so
    a worker only gets the cores they leave free, and none when they take them all: there a worker takes
    the same CPU time from the step as decoding between steps (measured equal within noise on 2 cores,
    docs/imagenet.md) and displaces a compute thread mid parallel region, and it costs a process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // world_size
    if torch.device(device).type == "cpu":
        return max(0, share - torch.get_num_threads())
    return max(1, share - 1)


@dataclass
class StreamSet:
    """One streamed split: the listing and its host transform (the streaming counterpart of ``DeviceSet``).

    Attributes:
        samples: The lazy listing.
        transform: Training (RandomResizedCrop views) or evaluation (resize + centre crop).
        device: Where batches go.
        workers: Decoding worker processes.
    """

    samples: LazySet
    transform: HostTransform
    device: torch.device
    workers: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def host_labels(self) -> np.ndarray:
        return self.samples.labels

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the networks see."""
        t = self.transform
        return (t.channels, t.image_size, t.image_size)

    def loader(self, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
               sampler: Sampler | None = None, views: int = 1) -> StreamBatchLoader:
        """Batches as :class:`~.loader.DeviceLoader` gives them (see its arguments); ``views``: training
        crops per image."""
        return StreamBatchLoader(self, batch_size, shuffle, seed, rank, world_size, sampler, views)


class StreamBatchLoader:
    """:class:`~.loader.DeviceLoader`'s interface over a :class:`StreamSet`: the same sampler rows (this
    rank's columns of the global batch), decoded by worker processes, every crop seeded by (seed, epoch,
    sample index, view). Evaluation: this rank's contiguous share in order (:func:`sequential_rows`)."""

    def __init__(self, data: StreamSet, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, sampler: Sampler | None = None, views: int = 1) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampler = sampler or Sampler()
        self.epoch = 0
        labels = data.host_labels
        if shuffle:
            self.sampler.check(labels, batch_size * world_size, world_size)
            self._n_batches = len(self.sampler.epoch(labels, batch_size * world_size, world_size, seed, 0))
        else:
            self._n_batches = len(sequential_rows(len(data), batch_size, rank, world_size))
        transform = dataclasses.replace(data.transform, seed=seed, views=views if shuffle else 1)
        self._stream = StreamLoader(StreamDataset(data.samples, transform), data.workers,
                                    pin_memory=data.device.type == "cuda", persistent=shuffle)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._n_batches

    def rows(self) -> list[np.ndarray] | torch.Tensor:
        """This epoch's rows of dataset indices, for this rank."""
        if not self.shuffle:
            return sequential_rows(len(self.data), self.batch_size, self.rank, self.world_size)
        n = self.batch_size * self.world_size
        return self.sampler.epoch(self.data.host_labels, n, self.world_size, self.seed, self.epoch)[
            :, self.rank::self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        for host in self._stream.batches(self.rows(), self.epoch):
            b = host.to(self.data.device)
            views = b.images  # (B, V, C, H, W), channels-last strides
            yield Batch(views[:, 0], b.labels, b.index, views)


def stream_bundle(splits: StreamSplits, val_split: float, seed: int, device: torch.device, image_size: int,
                  workers: int, train_transform: HostTransform, eval_transform: HostTransform) -> DataBundle:
    """The streaming :class:`~.loader.DataBundle`: a stratified, seeded validation split of the listing
    (the same indices as the in-memory path's), each split a :class:`StreamSet`."""
    tr_idx, val_idx = train_val_indices(splits.train.labels, splits.classes, val_split, seed)

    def wrap(s: LazySet, t: HostTransform) -> StreamSet:
        return StreamSet(s, t, device, workers)

    val = wrap(splits.train.subset(val_idx), eval_transform) if len(val_idx) else None
    return DataBundle(wrap(splits.train.subset(tr_idx), train_transform), val,  # type: ignore[arg-type]
                      wrap(splits.test, eval_transform), splits)  # type: ignore[arg-type]


def split_dirs(root: str | None, what: str) -> tuple[Path, Path]:
    """``root/train`` and ``root/test`` (or ``root/val``), or a one-line error naming what is missing."""
    if not root:
        raise PeerdistillError(f"dataset {what!r} needs data.root: a folder holding train/ and test/ (or val/)")
    d = Path(root).expanduser()
    test = next((d / s for s in ("test", "val") if (d / s).exists()), None)
    if not (d / "train").exists() or test is None:
        raise PeerdistillError(f"dataset {what!r} not found: {d} must hold train/ and test/ (or val/)")
    return d / "train", test


@DATASETS.register("shards")
def shards(root: str | None = None, image_size: Annotated[int, Interval(ge=8)] = 224,
           grayscale: bool = False) -> StreamSplits:
    """Webdataset shards as ``peerdistill pack`` writes them: ``root/train/*.tar`` and ``root/val/*.tar``
    (or ``test/``), each split with its ``meta.json``; always streamed.

    Args:
        root: The folder holding the ``train/`` and ``val/`` (or ``test/``) shard folders.
        image_size: Side of the square crops (the general ``data.image_size``).
        grayscale: Decode to one channel instead of RGB.
    """
    train_dir, test_dir = split_dirs(root, "shards")
    train = open_shards(train_dir)
    test = open_shards(test_dir, train.classes)
    channels = 1 if grayscale else 3
    mean, std = grey_stats(IMAGENET_MEAN, IMAGENET_STD, channels)
    return StreamSplits(train, test, train.classes, channels, image_size, mean, std,
                        meta={"path": str(Path(root or "").expanduser()), "test_split": test_dir.name})
