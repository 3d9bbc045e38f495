"""Which images are out-of-distribution for a run: held-out classes, another dataset, noise.

Every set comes back as uint8 ``(N, H, W, C)`` in the run's image shape, cut to a fixed seeded subset.
"""
from __future__ import annotations

import numpy as np

from ..data import DATASETS, ImageSet
from ..errors import PeerdistillError, nearest
from ..metrics.image_ops import LUMA

NOISE = ("gaussian", "uniform")
PAIRED = {"fashion_mnist": "mnist", "mnist": "fashion_mnist", "cifar10": "cifar100", "cifar100": "cifar10"}


def subset(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed seeded subset of ``range(n)`` (sorted); smaller limits give prefixes of one permutation."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:min(limit, n)])


def ood_sets(names: list[str], dataset: str, test: ImageSet, meta: dict[str, object], limit: int, seed: int,
             root: str | None = None) -> dict[str, np.ndarray]:
    """The OOD sets ``names`` for a run on ``dataset`` (whose test set is ``test`` and whose splits carry
    ``meta``); ``auto``: the held-out classes if the run has some, the paired dataset if it is
    installed, Gaussian and uniform noise."""
    def get(name: str, required: bool) -> np.ndarray | None:
        return _ood_set(name, dataset, test, meta, limit, seed, root, required)

    out: dict[str, np.ndarray] = {}
    dataset = DATASETS.canonical(dataset)  # a run written with an older spelling (fashion-mnist)
    for name in (DATASETS.canonical(n.strip()) for n in names if n.strip()):
        if name != "auto":
            out[name] = get(name, True)
            continue
        auto = (["holdout"] if "holdout" in meta else []) + ([PAIRED[dataset]] if dataset in PAIRED else [])
        for n in [*auto, *NOISE]:
            if n not in out and (images := get(n, False)) is not None:
                out[n] = images
    if not out:
        raise PeerdistillError("no OOD set selected (--ood-data)")
    return out


def _ood_set(name: str, dataset: str, test: ImageSet, meta: dict[str, object], limit: int, seed: int,
             root: str | None, required: bool) -> np.ndarray | None:
    shape = test.images.shape[1:]
    if name in NOISE:  # Gaussian N(0.5, 1) clipped (Hendrycks & Gimpel 2017), or uniform U[0, 1]
        rng = np.random.default_rng(seed + 17)
        x = rng.normal(0.5, 1.0, (limit, *shape)) if name == "gaussian" else rng.random((limit, *shape))
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    if name == "holdout":
        held = meta.get("holdout")
        if not isinstance(held, ImageSet):
            raise PeerdistillError("--ood-data holdout: this run holds no classes out (train it with "
                                   "data.holdout_classes=[...])")
        return held.images[subset(len(held), limit, seed)]
    if name not in DATASETS:
        raise PeerdistillError(f"unknown OOD set {name!r}{nearest(name, [*DATASETS, 'holdout', *NOISE, 'auto'])}")
    if name == dataset:
        raise PeerdistillError(f"--ood-data {name} is the run's own dataset, not out-of-distribution")
    try:
        other = DATASETS.build(name, **({"root": root} if root else {})).test
    except PeerdistillError:
        if required:
            raise
        return None
    images = match_channels(other.images, shape[-1], name)
    if images.shape[1:3] != shape[:2]:
        raise PeerdistillError(f"OOD set {name} has {images.shape[1]}x{images.shape[2]} images, the run "
                               f"{shape[0]}x{shape[1]}; resizing is not done")
    return images[subset(len(images), limit, seed)]


def match_channels(images: np.ndarray, c: int, name: str) -> np.ndarray:
    """Grey -> RGB by replication, RGB -> grey by ITU-R 601 luma; nothing else."""
    have = images.shape[-1]
    if have == c:
        return images
    if have == 1 and c == 3:
        return np.repeat(images, 3, -1)
    if have == 3 and c == 1:
        return (images.astype(np.float64) @ LUMA)[..., None].round().astype(np.uint8)
    raise PeerdistillError(f"OOD set {name} has {have} channels, the run {c}")
