"""ImageNet-like JPEG class folders made from Fashion-MNIST, for the streaming tests and benchmarks.

Each 28x28 garment is tinted (a random foreground and background colour over a smooth random gradient),
upscaled to a random aspect ratio (3/4 to 4/3) and a shorter side drawn from ``sides``, noised, and
saved as a quality-90 JPEG in ``<root>/<split>/<label>_<class>/<split>_<i>.jpg``. The noise level is
chosen per image so that its file size lands on a target drawn from ``target_kb`` (one re-encode with a
corrected level); images too small to carry that many bytes at a plausible noise level stay smaller (the
noise is capped), so the achieved sizes are what :func:`make_imagenet_like` returns. Every image is a
function of ``(seed, split, i)`` alone: the same call always writes the same bytes.

Without the Fashion-MNIST files the synthetic source's 28x28 class prototypes stand in.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from peerdistill.data.fashion_mnist import CLASSES, find_idx, read_idx

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MAX_SIGMA = 40.0  # beyond this the images are mostly noise; small images stay under the target size


def _sources(split: str, n_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N, 28, 28) uint8 garments, their labels (< n_classes) and the class folder names."""
    stem = {"train": "train", "val": "t10k"}[split]
    imgs, labels = find_idx(FMNIST, f"{stem}-images-idx3-ubyte"), find_idx(FMNIST, f"{stem}-labels-idx1-ubyte")
    if imgs and labels:
        x, y = read_idx(imgs), read_idx(labels).astype(np.int64)
        names = CLASSES
    else:
        from peerdistill.data.synthetic import synthetic

        s = synthetic(size=2000, num_classes=10, image_size=28, channels=1, test_size=500, seed=7)
        part = s.train if split == "train" else s.test
        x, y, names = part.images[..., 0], part.labels, s.classes
    keep = y < n_classes
    slugs = [f"{i}_{re.sub(r'[^a-z0-9]+', '-', n.lower()).strip('-')}" for i, n in enumerate(names[:n_classes])]
    return x[keep], y[keep], slugs


def _encode(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _render(garment: np.ndarray, rng: np.random.Generator, sides: tuple[int, int],
            aspect_range: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """The clean tinted, upscaled image (float32 HWC in [0, 255]) before noise."""
    from PIL import Image

    short = int(rng.integers(sides[0], sides[1] + 1))
    aspect = float(np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1]))))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    fg, bg0, bg1 = rng.uniform(40, 255, 3), rng.uniform(0, 200, 3), rng.uniform(0, 200, 3)
    big = Image.fromarray(garment).resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(big, np.float32)[..., None] / 255.0  # (h, w, 1) garment mask
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0)
    t = t + np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None] * rng.uniform(0.0, 0.7)
    background = bg0 + (bg1 - bg0) * np.clip(t, 0, 1)
    return a * fg + (1 - a) * background


def _noised(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(clean.shape, dtype=np.float32) * sigma
    return np.clip(clean + noise, 0, 255).astype(np.uint8)


def make_image(garment: np.ndarray, rng: np.random.Generator, sides: tuple[int, int] = (200, 500),
               target_kb: tuple[float, float] | None = (75, 110), quality: int = 90,
               aspect: tuple[float, float] = (3 / 4, 4 / 3)) -> bytes:
    """One ImageNet-like JPEG from a 28x28 grey garment; ``target_kb=None``: a fixed, light noise."""
    clean = _render(garment, rng, sides, aspect)
    seed = int(rng.integers(2**31))
    if target_kb is None:
        return _encode(_noised(clean, 6.0, np.random.default_rng(seed)), quality)
    target = rng.uniform(*target_kb) * 1024
    # File size grows about linearly with the noise level in this range: guess, measure, correct once.
    sigma = min(MAX_SIGMA, 2.0 + target / clean.shape[0] / clean.shape[1] * 20.0)
    data = _encode(_noised(clean, sigma, np.random.default_rng(seed)), quality)
    if abs(len(data) - target) > 0.1 * target and not (sigma >= MAX_SIGMA and len(data) < target):
        sigma = float(np.clip(sigma * target / len(data), 1.0, MAX_SIGMA))
        data = _encode(_noised(clean, sigma, np.random.default_rng(seed)), quality)
    return data


def make_imagenet_like(root: str | Path, n_train: int, n_val: int = 0, n_classes: int = 10, seed: int = 0,
                       sides: tuple[int, int] = (200, 500), target_kb: tuple[float, float] | None = (75, 110),
                       quality: int = 90, aspect: tuple[float, float] = (3 / 4, 4 / 3)) -> dict[str, list[int]]:
    """Write ``root/train`` (and ``root/val``) class folders of ImageNet-like JPEGs.

    Args:
        root: Output folder (created).
        n_train, n_val: Images per split; image i shows garment ``i mod N`` of the split's source.
        n_classes: Classes (at most 10); folders ``<label>_<name>`` so the sorted order is the label order.
        seed: Everything is a function of (seed, split, i).
        sides: Range of the shorter side in pixels.
        target_kb: Range of the file-size targets, or None for a fixed noise level (tiny test images).
        quality: JPEG quality.
        aspect: Range of the aspect ratio (width / height); ``(1, 1)`` writes square images.

    Returns:
        The file sizes in bytes written per split.
    """
    sizes: dict[str, list[int]] = {}
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        if n <= 0:
            continue
        x, y, slugs = _sources(split, n_classes)
        for s in slugs:
            (Path(root) / split / s).mkdir(parents=True, exist_ok=True)
        sizes[split] = []
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            data = make_image(x[i % len(x)], rng, sides, target_kb, quality, aspect)
            (Path(root) / split / slugs[y[i % len(x)]] / f"{split}_{i:07d}.jpg").write_bytes(data)
            sizes[split].append(len(data))
    return sizes
