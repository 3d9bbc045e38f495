"""Common corruptions at five severities (Hendrycks & Dietterich, ICLR 2019), generated on the fly.

The definitions and constants are those of the CIFAR-10-C / CIFAR-100-C generator
(``hendrycks/robustness``, ``ImageNet-C/create_c/make_cifar_c.py``), the standard for 32x32 images,
written here in NumPy (+ Pillow for JPEG and pixelate) and vectorised over the batch:

* same maths, own random streams: every image draws from its own generator, seeded by
  ``(seed, family, severity, dataset index)``, so a corrupted image does not depend on the batch,
  on ``--limit`` or on the global NumPy state (the reference uses the global state);
* ``motion_blur`` and ``snow`` use ImageMagick's MotionBlurImage kernel (a one-sided Gaussian of
  width 2r+1, edge pixels repeated), written out here instead of calling Wand, as the
  ``imagecorruptions`` package also does; ``elastic_transform``'s affine warp samples bilinearly
  without OpenCV's 1/32-pixel coordinate rounding: both differ from the reference by at most one
  grey level in most pixels;
* ``glass_blur`` copies each pixel's neighbour onto it, as the reference really does (its NumPy
  tuple "swap" of two pixel views copies rather than swaps);
* ``frost`` (the reference's frost photographs) and ``spatter`` (OpenCV's Canny / distance
  transform) need the ``corruptions`` extra (``imagecorruptions`` ships the frost images, OpenCV
  comes with it);
* image sizes other than 32x32 use the same constants in pixels (the fog fractal is the next power
  of two, cropped), except ``elastic_transform``, whose constants are fractions of the side;
* grey images stay grey: channel-wise families act on the one channel, the colour ones (brightness,
  saturate, frost, spatter) on the replicated RGB image, converted back with the ITU-R 601 luma
  weights (so grey saturate is only a slight darkening at severities 4-5).

``imagecorruptions_corrupt`` runs the ``imagecorruptions`` package instead (ImageNet-C constants,
images of at least 32x32) for users who want those definitions.
"""
from __future__ import annotations

import importlib.resources
import inspect
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import PeerdistillError
from ..robust_options import ALL, COMMON, DEFAULT, NEEDS_EXTRA, resolve_families  # noqa: F401 (the family names)
from . import image_ops as ops
from .image_ops import Rngs

EXTRA_HINT = "pip install 'peerdistill[corruptions]' (or pip install imagecorruptions-imaug)"


def _colour(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """A colour operation on RGB; grey images are replicated to RGB and converted back with luma."""
    return fn(x) if x.shape[-1] == 3 else ops.luma(fn(np.repeat(x, 3, -1)))


# ----------------------------------------------------------------------------------- families
# Each takes (N, H, W, C) float64 in [0, 1], the severity's constants and one generator per image,
# and returns values in [0, 255] (truncated to uint8 by the caller, as the reference's np.uint8).

def gaussian_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    return np.clip(x + c * ops.stack(rngs, lambda r: r.standard_normal(x.shape[1:])), 0, 1) * 255


def shot_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    return np.clip(np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / c, 0, 1) * 255


def impulse_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """skimage's ``s&p``: each value replaced with probability ``c``, by 1 or 0 with equal odds."""
    u = ops.stack(rngs, lambda r: r.random((2, *x.shape[1:])))
    flip, salt = u[:, 0] < c, u[:, 1] < 0.5
    return np.where(flip, np.where(salt, 1.0, 0.0), x) * 255


def speckle_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    return np.clip(x + x * c * ops.stack(rngs, lambda r: r.standard_normal(x.shape[1:])), 0, 1) * 255


def gaussian_blur(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    return np.clip(ops.gaussian_filter(x, c), 0, 1) * 255


def glass_blur(x: np.ndarray, c: tuple[float, int, int], rngs: Rngs) -> np.ndarray:
    sigma, delta, iters = c
    y = (ops.gaussian_filter(x, sigma) * 255).astype(np.uint8)
    n, h, w = y.shape[:3]
    spots = [(i, j) for _ in range(iters) for i in range(h - delta, delta, -1) for j in range(w - delta, delta, -1)]
    d = np.stack([r.integers(-delta, delta, size=(len(spots), 2)) for r in rngs], 1)  # (S, N, 2) = dx, dy
    b = np.arange(n)
    for (i, j), (dx, dy) in zip(spots, d.transpose(0, 2, 1)):
        y[b, i, j] = y[b, i + dy, j + dx]  # the reference's "swap" of two views is this copy
    return np.clip(ops.gaussian_filter(y / 255.0, sigma), 0, 1) * 255


def defocus_blur(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    return np.clip(ops.filter2d(x, ops.disk(*c)), 0, 1) * 255


def motion_blur(x: np.ndarray, c: tuple[int, float], rngs: Rngs) -> np.ndarray:
    angles = ops.stack(rngs, lambda r: r.uniform(-45, 45))
    return np.clip(ops.motion_blur(np.round(x * 255), c[0], c[1], angles), 0, 255)


def zoom_blur(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    zooms = np.arange(1, c[0], c[1])
    x = x.astype(np.float32)  # float32 throughout, as the reference (scipy's zoom returns the input's type)
    out = np.zeros_like(x)
    for z in zooms:
        out += ops.clipped_zoom(x.astype(np.float64), z).astype(np.float32)
    return np.clip((x + out) / np.float32(len(zooms) + 1), 0, 1) * np.float32(255)


def snow(x: np.ndarray, c: tuple[float, ...], rngs: Rngs) -> np.ndarray:
    loc, scale, zoom, thresh, radius, sigma, keep = c
    layer = ops.clipped_zoom(ops.stack(rngs, lambda r: r.normal(loc, scale, x.shape[1:3]))[..., None], zoom)
    layer[layer < thresh] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8).astype(np.float64)
    layer = ops.motion_blur(layer, int(radius), sigma, ops.stack(rngs, lambda r: r.uniform(-135, -45))) / 255
    x = keep * x + (1 - keep) * np.maximum(x, ops.luma(x) * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, 2, axes=(1, 2)), 0, 1) * 255


def fog(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    h, w = x.shape[1:3]
    top = x.max((1, 2, 3), keepdims=True)
    frac = ops.plasma(rngs, 1 << (max(h, w) - 1).bit_length(), c[1])[:, :h, :w, None]
    return np.clip((x + c[0] * frac) * top / (top + c[0]), 0, 1) * 255


def brightness(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    def shift(rgb: np.ndarray) -> np.ndarray:
        hsv = ops.rgb_to_hsv(rgb)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        return ops.hsv_to_rgb(hsv)
    return np.clip(_colour(shift, x), 0, 1) * 255


def saturate(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    def sat(rgb: np.ndarray) -> np.ndarray:
        hsv = ops.rgb_to_hsv(rgb)
        hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
        return ops.hsv_to_rgb(hsv)
    return np.clip(_colour(sat, x), 0, 1) * 255


def contrast(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    mean = x.mean((1, 2), keepdims=True)
    return np.clip((x - mean) * c + mean, 0, 1) * 255


def _pil_each(x: np.ndarray, fn: Callable[[object], object]) -> np.ndarray:
    from PIL import Image

    u8 = np.round(x * 255).astype(np.uint8)
    grey = u8.shape[-1] == 1
    outs = [np.asarray(fn(Image.fromarray(im[..., 0] if grey else im))) for im in u8]
    return np.stack([o[..., None] if grey else o for o in outs]).astype(np.float64)


def jpeg_compression(x: np.ndarray, c: int, rngs: Rngs) -> np.ndarray:
    from PIL import Image

    def jpeg(im: object) -> object:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=c)
        return Image.open(buf)
    return _pil_each(x, jpeg)


def pixelate(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    from PIL import Image

    h, w = x.shape[1:3]
    return _pil_each(x, lambda im: im.resize((int(w * c), int(h * c)), Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))


def elastic_transform(x: np.ndarray, c: tuple[float, float, float], rngs: Rngs) -> np.ndarray:
    """A random affine warp (corner jitter ``c[2]``) then a smooth displacement field (scale ``c[0]``,
    smoothness ``c[1]``); the constants are fractions of the image side (the reference's ``IMSIZE``)."""
    n, h, w = x.shape[:3]
    alpha, sigma, jitter = (h * v for v in c)
    centre, sq = np.array([h // 2, w // 2], np.float64), min(h, w) // 3
    src = np.stack([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])  # (3, 2) as (x, y)
    dst = src[None] + ops.stack(rngs, lambda r: r.uniform(-jitter, jitter, (3, 2)).astype(np.float32))
    ones = np.ones((n, 3, 1))
    fwd = np.linalg.solve(np.concatenate([src[None].repeat(n, 0), ones], 2), dst)  # (N, 3, 2): [x y 1] @ M
    inv = np.linalg.inv(np.concatenate([fwd, np.tile([[[0], [0], [1]]], (n, 1, 1))], 2))  # dst -> src
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([xx, yy, np.ones_like(xx)], -1).reshape(-1, 3).astype(np.float64)
    sx, sy = (pts @ inv[:, :, :2]).reshape(n, h, w, 2).transpose(3, 0, 1, 2)
    x = ops.bilinear(x.astype(np.float32), sy, sx, "reflect101")
    field = [ops.gaussian_filter(ops.stack(rngs, lambda r: r.uniform(-1, 1, (h, w))), sigma, "symmetric", 3.0) * alpha
             for _ in range(2)]  # dx then dy, as the reference draws them
    dx, dy = (f.astype(np.float32) for f in field)
    out = ops.bilinear(x, yy[None] + dy, xx[None] + dx, "symmetric")
    return np.clip(out, 0, 1) * 255


def _cv2() -> object:
    try:
        import cv2
    except ImportError:
        raise PeerdistillError(f"the frost and spatter corruptions need OpenCV: {EXTRA_HINT}") from None
    return cv2


_FROST: list[np.ndarray] = []


def _frost_images() -> list[np.ndarray]:
    """The reference's frost photographs (shipped by ``imagecorruptions``), scaled by 0.2, RGB."""
    if not _FROST:
        cv2 = _cv2()
        try:
            base = importlib.resources.files("imagecorruptions") / "frost"
        except ModuleNotFoundError:
            raise PeerdistillError(f"the frost corruption needs the frost images of imagecorruptions: "
                                   f"{EXTRA_HINT}") from None
        for name in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"):
            img = cv2.imread(str(base / name))
            _FROST.append(cv2.resize(img, (0, 0), fx=0.2, fy=0.2)[..., ::-1].astype(np.float64))
    return _FROST


def frost(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """``c[0] * x + c[1] * frost`` with a random crop of one of five frost photographs (the reference
    draws ``randint(5)``, so the sixth file is never used)."""
    h, w = x.shape[1:3]
    crops = []
    for r in rngs:
        f = _frost_images()[int(r.integers(5))]
        i, j = int(r.integers(0, f.shape[0] - h)), int(r.integers(0, f.shape[1] - w))
        crops.append(f[i:i + h, j:j + w])
    layer = np.stack(crops)
    return np.clip(c[0] * x * 255 + c[1] * (layer if x.shape[-1] == 3 else ops.luma(layer)), 0, 255)


def spatter(x: np.ndarray, c: tuple[float, ...], rngs: Rngs) -> np.ndarray:
    """Water drops (severities 1-3: Canny edges, distance transform, embossing) or mud (4-5)."""
    cv2 = _cv2()
    loc, scale, sigma, thresh, strength, mud = c
    liquid = ops.gaussian_filter(ops.stack(rngs, lambda r: r.normal(loc, scale, x.shape[1:3])), sigma)
    liquid[liquid < thresh] = 0
    if mud:
        m = ops.gaussian_filter(np.where(liquid > thresh, 1.0, 0.0).astype(np.float32), strength)
        m[m < 0.8] = 0
        colour = np.array([63, 42, 20]) / 255.0 * m[..., None]
        return _colour(lambda rgb: np.clip(rgb * (1 - m[..., None]) + colour, 0, 1), x) * 255
    masks = []
    for layer in (liquid * 255).astype(np.uint8):
        dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
        dist = cv2.blur(cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)[1], (3, 3)).astype(np.uint8)
        dist = cv2.filter2D(cv2.equalizeHist(dist), cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        m = layer.astype(np.float32) * cv2.blur(dist, (3, 3)).astype(np.float32)
        masks.append(m / max(float(m.max()), 1e-12) * strength)  # the reference divides by the max
    colour = np.stack(masks)[..., None] * (np.array([175, 238, 238]) / 255.0)  # pale turquoise water
    return _colour(lambda rgb: np.clip(rgb + colour, 0, 1), x) * 255


# Severity constants of make_cifar_c.py, in order 1..5.
SEVERITIES: dict[str, tuple[object, ...]] = {
    "gaussian_noise": (0.04, 0.06, .08, .09, .10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (.01, .02, .03, .05, .07),
    "speckle_noise": (.06, .1, .12, .16, .2),
    "gaussian_blur": (.4, .6, 0.7, .8, 1),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),  # np.arange(1, stop, step)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (.05, .1, .15, .2, .3),
    "contrast": (.75, .5, .4, .3, 0.15),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
}
FAMILIES: dict[str, Callable[..., np.ndarray]] = {name: globals()[name] for name in ALL}


def corrupt(images: np.ndarray, family: str, severity: int, seed: int = 0,
            index: np.ndarray | None = None) -> np.ndarray:
    """Corrupt uint8 ``(N, H, W, C)`` images (C = 1 or 3) with ``family`` at ``severity`` (1..5).

    Args:
        images: clean images.
        family: a name of :data:`FAMILIES`.
        severity: 1 (mild) to 5 (strong).
        seed: base seed; image ``i`` draws from a generator seeded by
            ``(seed, family, severity, index[i])``, so it is corrupted the same way in any batch.
        index: (N,) dataset indices of the images (default ``0..N-1``).

    Returns:
        uint8 images of the same shape (values truncated as the reference's ``np.uint8``).
    """
    if family not in FAMILIES:
        resolve_families([family])
    if not 1 <= severity <= 5:
        raise PeerdistillError(f"corruption severity must be 1..5, got {severity}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PeerdistillError(f"corrupt() takes uint8 (N, H, W, 1 or 3) images, got {images.dtype} {images.shape}")
    index = np.arange(len(images)) if index is None else np.asarray(index)
    fid = ALL.index(family)
    rngs = [np.random.default_rng([seed, fid, severity, int(i)]) for i in index]
    out = FAMILIES[family](images.astype(np.float64) / 255.0, SEVERITIES[family][severity - 1], rngs)
    return np.clip(out, 0, 255).astype(np.uint8)


def imagecorruptions_corrupt(images: np.ndarray, family: str, severity: int, seed: int = 0,
                             index: np.ndarray | None = None) -> np.ndarray:
    """The ``imagecorruptions`` package's version (ImageNet-C constants; at least 32x32 pixels),
    with the global NumPy state seeded per image and restored afterwards."""
    try:
        import imagecorruptions as ic
    except ImportError:
        raise PeerdistillError(f"corruption source 'imagecorruptions' needs the package: {EXTRA_HINT}") from None
    if min(images.shape[1:3]) < 32:
        raise PeerdistillError(f"imagecorruptions (ImageNet-C definitions) needs images of at least 32x32, got "
                               f"{images.shape[1]}x{images.shape[2]}; use the built-in CIFAR-C definitions")
    fn = ic.corruption_dict[family]
    takes_seed = "seed" in inspect.signature(fn).parameters
    index = np.arange(len(images)) if index is None else np.asarray(index)
    state = np.random.get_state()
    out = []
    try:
        for img, i in zip(images, index):
            s = int(np.random.SeedSequence([seed, ALL.index(family), severity, int(i)]).generate_state(1)[0])
            np.random.seed(s)
            rgb = np.repeat(img, 3, -1) if img.shape[-1] == 1 else img
            res = ic.corrupt(rgb, severity, family, **({"seed": s} if takes_seed else {}))
            out.append(ops.luma(res.astype(np.float64)).round().astype(np.uint8) if img.shape[-1] == 1 else res)
    finally:
        np.random.set_state(state)
    return np.stack(out)


# ------------------------------------------------------------------------- published CIFAR-C
def read_npy_corruption(folder: str | Path, family: str, subset: np.ndarray | None = None
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read ``<folder>/<family>.npy`` (uint8 (5*n, H, W, 3), severities 1..5 stacked) and
    ``<folder>/labels.npy``; returns five ``(images, labels)``, optionally of the rows ``subset``
    (indices into one severity's n test images)."""
    folder = Path(folder)
    try:
        data = np.load(folder / f"{family}.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PeerdistillError(f"cannot read {folder / family}.npy or labels.npy: {e}") from None
    if data.dtype != np.uint8 or data.ndim != 4 or len(data) != len(labels) or len(data) % 5:
        raise PeerdistillError(f"{folder / family}.npy: expected uint8 (5*n, H, W, C) matching labels.npy, "
                               f"got {data.dtype} {data.shape} and {len(labels)} labels")
    n = len(data) // 5
    rows = np.arange(n) if subset is None else np.asarray(subset)
    if len(rows) and rows.max() >= n:
        raise PeerdistillError(f"{folder / family}.npy holds {n} images per severity; asked for index {rows.max()}")
    return [(np.asarray(data[s * n + rows]), labels[s * n + rows].astype(np.int64)) for s in range(5)]
