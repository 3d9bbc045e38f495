"""Loader, validation split, batched augmentation, IDX reading, and the calibration maths."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from peerdistill.data.batch_augment import BatchAugment, cutout, random_crop, random_flip
from peerdistill.data.base import ImageSet
from peerdistill.data.fashion_mnist import read_idx
from peerdistill.data.loader import DeviceLoader, DeviceSet, stratified_split
from peerdistill.metrics import expected_calibration_error


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(5), [100, 50, 20, 10, 200])
    tr, val = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(tr, val)) == 0 and len(tr) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [10, 5, 2, 1, 20]
    tr2, val2 = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(val, val2)
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])


def test_loader_covers_each_sample_once_per_epoch_and_reshuffles():
    data = DeviceSet(ImageSet(np.zeros((103, 4, 4, 1), np.uint8), np.arange(103) % 3), "cpu")
    ordered = torch.cat([b.index for b in DeviceLoader(data, 10, shuffle=False)])
    assert ordered.tolist() == list(range(103))  # evaluation: every sample, in order
    loader = DeviceLoader(data, 10, shuffle=True, seed=0)
    idx0 = torch.cat([b.index for b in loader])
    assert len(set(idx0.tolist())) == len(idx0) == 100  # training: distinct samples, last partial batch dropped
    loader.set_epoch(1)
    idx1 = torch.cat([b.index for b in loader])
    assert not torch.equal(idx0, idx1)
    loader.set_epoch(0)
    assert torch.equal(idx0, torch.cat([b.index for b in loader]))
    assert len(DeviceLoader(data, 10, True)) == 10


def test_loader_shards_disjointly_across_ranks():
    data = DeviceSet(ImageSet(np.zeros((40, 2, 2, 1), np.uint8), np.arange(40) % 2), "cpu")
    shards = [torch.cat([b.index for b in DeviceLoader(data, 5, True, 0, r, 2)]) for r in range(2)]
    assert len(np.intersect1d(shards[0].numpy(), shards[1].numpy())) == 0
    assert len(shards[0]) == len(shards[1]) == 20


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, g)
    g2 = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(5, (6,), generator=g2), torch.randint(5, (6,), generator=g2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8])


def test_flip_and_cutout():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = random_flip(x.repeat(20, 1, 1, 1), g)
    flipped = [torch.equal(o, x[i % 2].flip(2)) for i, o in enumerate(out)]
    kept = [torch.equal(o, x[i % 2]) for i, o in enumerate(out)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    ones = torch.ones(50, 1, 32, 32)
    holes = (cutout(ones, 8, g) == 0).sum((1, 2, 3))
    assert holes.max() == 64 and holes.min() > 0  # 8x8 when inside, clipped at borders


def test_normalize_and_channels_last():
    aug = BatchAugment((0.5,), (0.25,), padding=0, flip=False, channels_last=True)
    x = torch.full((2, 1, 3, 3), 255, dtype=torch.uint8)
    out = aug(x)
    assert torch.allclose(out, torch.full_like(out, 2.0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_idx_reader_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (3, 5, 7), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes())
    assert np.array_equal(read_idx(path), arr)


@pytest.mark.numerical
def test_ece_golden():
    conf = torch.tensor([0.95, 0.9, 0.62, 0.55, 0.3, 1 / 15])
    correct = torch.tensor([1, 0, 1, 1, 0, 0])
    # Hand-binned with 15 bins of width 1/15, bins are (lo, hi]:
    # 0.95 & 0.9 -> bin 14 ([14/15, 1]: 0.95 only); 0.9 -> bin 13; 0.62 -> bin 9; 0.55 -> bin 8;
    # 0.3 -> bin 4; 1/15 -> bin 0.
    bins: dict[int, list[tuple[float, int]]] = {}
    for c, a in zip(conf.tolist(), correct.tolist()):
        b = max(int(np.ceil(c * 15)) - 1, 0)
        bins.setdefault(b, []).append((c, a))
    expected = sum(len(v) / 6 * abs(np.mean([a for _, a in v]) - np.mean([c for c, _ in v])) for v in bins.values())
    assert expected_calibration_error(conf, correct, 15) == pytest.approx(expected, abs=1e-6)
    assert expected_calibration_error(torch.tensor([0.7, 0.7]), torch.tensor([1, 0])) == pytest.approx(0.2)
