"""Image operations behind :mod:`peerdistill.metrics.corruptions`, on batches ``(N, H, W[, C])``.

Each reproduces the library call the CIFAR-C generator makes (scipy/skimage Gaussian filter, OpenCV
``filter2D`` and the anti-aliased disk, scipy ``zoom(order=1)``, ImageMagick ``MotionBlurImage``,
skimage's RGB <-> HSV, the diamond-square fog fractal, bilinear sampling with folded borders), in
NumPy, in the same arithmetic order where the result is truncated to uint8 afterwards.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as cv2's RGB2GRAY and PIL's "L"
Rngs = list[np.random.Generator]


def stack(rngs: Rngs, draw: Callable[[np.random.Generator], np.ndarray | float]) -> np.ndarray:
    """One draw per image generator, stacked: (N, ...)."""
    return np.stack([np.asarray(draw(r), dtype=np.float64) for r in rngs])


def pad(x: np.ndarray, r: int, mode: str, axes: tuple[int, ...] = (1, 2)) -> np.ndarray:
    width = [(r, r) if a in axes else (0, 0) for a in range(x.ndim)]
    return np.pad(x, width, mode=mode)


def correlate1d(x: np.ndarray, k: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """Correlation with a symmetric kernel, summed in scipy's order (centre, then the pairs from the
    outside in), so that values truncated to uint8 afterwards land on the same side as scipy's."""
    r = len(k) // 2
    p = pad(x, r, mode, (axis,))
    n = x.shape[axis]

    def shifted(i: int) -> np.ndarray:
        return np.take(p, np.arange(r + i, r + i + n), axis=axis)

    out = shifted(0) * k[r]
    for j in range(r, 0, -1):
        out = out + (shifted(-j) + shifted(j)) * k[r + j]
    return out


def gaussian_filter(x: np.ndarray, sigma: float, mode: str = "edge", truncate: float = 4.0) -> np.ndarray:
    """scipy/skimage ``gaussian`` over axes 1, 2 of (N, H, W[, C]): radius ``int(truncate*sigma + .5)``;
    ``mode`` as ``np.pad`` (skimage's default ``nearest`` = ``edge``, its ``reflect`` = ``symmetric``)."""
    r = int(truncate * sigma + 0.5)
    if sigma <= 0 or r == 0:
        return x.astype(np.float64)
    k = np.exp(-0.5 / (sigma * sigma) * np.arange(-r, r + 1) ** 2)  # scipy's _gaussian_kernel1d
    k = k / k.sum()
    return correlate1d(correlate1d(x.astype(np.float64), k, 1, mode), k, 2, mode)


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: 17x17 indicator, normalised, then cv2.GaussianBlur 3x3."""
    t = np.arange(-8, 9)
    d = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).astype(np.float32)  # float32, as the reference
    d /= d.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))  # cv2.getGaussianKernel(3, sigma)
    g = (g / g.sum()).astype(np.float32)
    d = correlate1d(correlate1d(d[None], g, 1, "reflect"), g, 2, "reflect")[0].astype(np.float64)
    nz = np.flatnonzero(d.any(0) | d.any(1))
    r = int(max(8 - nz.min(), nz.max() - 8))  # zeros outside contribute nothing: crop for speed
    return d[8 - r:9 + r, 8 - r:9 + r]


def filter2d(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """cv2.filter2D (correlation, BORDER_REFLECT_101 = numpy ``reflect``) over axes 1, 2."""
    r = k.shape[0] // 2
    p = pad(x, r, "reflect")
    h, w = x.shape[1:3]
    return sum(k[i, j] * p[:, i:i + h, j:j + w] for i in range(k.shape[0]) for j in range(k.shape[1]))


def zoom(x: np.ndarray, z: float) -> np.ndarray:
    """scipy.ndimage.zoom(order=1) over axes 1, 2: output ``round(n*z)``, corners aligned."""
    for axis in (1, 2):
        n = x.shape[axis]
        m = int(round(n * z))
        pos = np.clip(np.arange(m) * ((n - 1) / (m - 1) if m > 1 else 0.0), 0, n - 1)
        lo = np.minimum(np.floor(pos).astype(int), n - 2)
        f = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        x = np.take(x, lo, axis) * (1 - f) + np.take(x, lo + 1, axis) * f
    return x


def clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """Zoom the centre crop of side ``ceil(n/z)`` back to (about) ``n`` and trim to ``n``."""
    h, w = x.shape[1:3]
    ch, cw = math.ceil(h / z), math.ceil(w / z)
    top, left = (h - ch) // 2, (w - cw) // 2
    out = zoom(x[:, top:top + ch, left:left + cw], z)
    th, tw = (out.shape[1] - h) // 2, (out.shape[2] - w) // 2
    return out[:, th:th + h, tw:tw + w]


def motion_blur(x: np.ndarray, radius: int, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick MotionBlurImage on (N, H, W, C) in [0, 255]: a one-sided Gaussian (width
    ``2*radius + 1``) along each image's angle, edge pixels repeated; rounded to ImageMagick's 16-bit
    quantum, then truncated to 8 bits as its PNG output is (this reproduces Wand's result exactly)."""
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    n, h, w = x.shape[:3]
    p = pad(x, width, "edge")
    out = np.zeros_like(x, dtype=np.float64)
    rad = np.deg2rad(angles)
    rows = np.arange(h)[None, :, None] + width
    cols = np.arange(w)[None, None, :] + width
    b = np.arange(n)[:, None, None]
    for i in range(width):
        dy = np.ceil(i * np.sin(rad) - 0.5).astype(int)[:, None, None]  # MagickCore: offset.y from sin
        dx = np.ceil(i * np.cos(rad) - 0.5).astype(int)[:, None, None]
        out += k[i] * p[b, rows + dy, cols + dx]
    return np.floor(np.floor(out * 257 + 0.5) / 257)  # 8 -> 16 bits is x 257


def luma(x: np.ndarray) -> np.ndarray:
    return (x[..., :3] * LUMA).sum(-1, keepdims=True) if x.shape[-1] == 3 else x


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv on (..., 3) in [0, 1] (ties of the max: blue over green over red)."""
    v = x.max(-1)
    delta = np.ptp(x, -1)
    safe = np.where(delta == 0, 1.0, delta)
    s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(b == v, 4 + (r - g) / safe, np.where(g == v, 2 + (b - r) / safe, (g - b) / safe))
    h = np.where(delta == 0, 0.0, (h / 6) % 1)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb on (..., 3)."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = [hi.astype(int) % 6 == k for k in range(6)]
    rgb = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))  # per channel, sectors 0..5
    return np.stack([np.select(sector, ch) for ch in rgb], -1)


def plasma(rngs: Rngs, size: int, decay: float) -> np.ndarray:
    """Diamond-square fractal (N, size, size) in [0, 1] (the reference's ``plasma_fractal``)."""
    n = len(rngs)
    a = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def noisy(v: np.ndarray) -> np.ndarray:
        return v / 4 + wibble * stack(rngs, lambda r: r.uniform(-wibble, wibble, v.shape[1:]))

    while step >= 2:
        h = step // 2
        corner = a[:, ::step, ::step]
        sq = corner + np.roll(corner, -1, 1)
        a[:, h::step, h::step] = noisy(sq + np.roll(sq, -1, 2))
        dr, ul = a[:, h::step, h::step], a[:, ::step, ::step]
        a[:, ::step, h::step] = noisy(dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 2))
        a[:, h::step, ::step] = noisy(dr + np.roll(dr, 1, 2) + ul + np.roll(ul, -1, 1))
        step //= 2
        wibble /= decay
    a -= a.min((1, 2), keepdims=True)
    return a / a.max((1, 2), keepdims=True)


def fold(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Indices outside [0, n) folded back: ``reflect101`` (d c b | a b c d) or ``symmetric`` (c b a | a b c)."""
    if mode == "reflect101":
        period = 2 * (n - 1)
        i = np.mod(i, period)
        return np.where(i >= n, period - i, i)
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def bilinear(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Sample (N, H, W, C) at per-image float (rows, cols) of shape (N, H, W) with folded borders."""
    n, h, w = img.shape[:3]
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    b = np.arange(n)[:, None, None]

    def at(dr: int, dc: int) -> np.ndarray:
        return img[b, fold(r0.astype(int) + dr, h, mode), fold(c0.astype(int) + dc, w, mode)]

    return (at(0, 0) * (1 - fr) * (1 - fc) + at(0, 1) * (1 - fr) * fc + at(1, 0) * fr * (1 - fc)
            + at(1, 1) * fr * fc)
