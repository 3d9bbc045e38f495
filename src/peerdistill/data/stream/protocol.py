"""The ImageNet protocol's geometry: RandomResizedCrop boxes for training, resize + centre crop for
evaluation, and the per-sample generators every host draw comes from.

Boxes are ``(x, y, w, h)`` in pixels of the full-size image (left, top, width, height). The training
box follows torchvision's ``RandomResizedCrop.get_params`` step by step (10 attempts at a random area and
log-uniform aspect ratio, then a central crop clamped to the ratio range), so the crops have the
statistics the published ImageNet numbers were trained with.
"""
from __future__ import annotations

import math

import numpy as np

Box = tuple[int, int, int, int]

# A fixed tag in every generator's key, so host draws never coincide with another stream seeded from
# the same (seed, epoch) numbers (the samplers use 0x5A3).
_HOST_STREAM = 0x1A6E
_U64 = (1 << 64) - 1
_ATTEMPTS = 10  # RandomResizedCrop's tries before its central fallback


def _philox_key(seed: int, epoch: int, index: int, view: int) -> tuple[list[int], list[int]]:
    """Philox's (counter, key) of one view: a counter-based generator needs no seeding pass, so a
    per-sample stream costs a state write (about 5 µs here) instead of a SeedSequence hash (about 35 µs)."""
    return [0, 0, index & _U64, view & _U64], [seed & _U64, ((_HOST_STREAM << 48) ^ epoch) & _U64]


def sample_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    """The generator of every host draw for one view of one sample.

    A function of its arguments alone: the same crop comes out whichever worker or process decodes the
    sample, and an epoch replays exactly after ``--resume``.
    """
    counter, key = _philox_key(seed, epoch, index, view)
    return np.random.Generator(np.random.Philox(counter=counter, key=key))


class SampleDraws:
    """:func:`sample_rng`'s streams through one reused generator (a worker draws one view at a time):
    ``at(...)`` gives the same numbers as ``sample_rng(...)``, valid until the next ``at``."""

    def __init__(self) -> None:
        self._gen = np.random.Generator(np.random.Philox(0))
        # One state dict whose arrays are overwritten in place: the setter copies them into the generator,
        # and building fresh arrays each time cost three times as much as the draws.
        self._state = {"bit_generator": "Philox", "buffer": np.zeros(4, np.uint64), "buffer_pos": 4,
                       "has_uint32": 0, "uinteger": 0,
                       "state": {"counter": np.zeros(4, np.uint64), "key": np.zeros(2, np.uint64)}}

    def at(self, seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
        counter, key = _philox_key(seed, epoch, index, view)
        self._state["state"]["counter"][:] = counter
        self._state["state"]["key"][:] = key
        self._gen.bit_generator.state = self._state
        return self._gen


def rrc_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A RandomResizedCrop box (torchvision's algorithm).

    Args:
        width, height: Size of the image.
        rng: The sample's generator (:func:`sample_rng`); one block of uniforms is drawn from it.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height), drawn log-uniformly.

    Returns:
        ``(x, y, w, h)`` with ``0 <= x``, ``x + w <= width`` (and the same for y, h).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = rng.random(2 * _ATTEMPTS + 2).tolist()  # one call: the area and ratio of each try, then the corner
    for k in range(_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * k + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(u[-2] * (height - h + 1))
            x = int(u[-1] * (width - w + 1))
            return x, y, w, h
    return central_box(width, height, ratio)


def central_box(width: int, height: int, ratio: tuple[float, float]) -> Box:
    """RandomResizedCrop's fallback: the whole image, cut to the nearest allowed aspect ratio, centred."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_size(image_size: int, crop_pct: float) -> int:
    """The evaluation resize of the shorter side: ``floor(image_size / crop_pct)`` (256 for 224 at 0.875)."""
    return int(math.floor(image_size / crop_pct + 1e-9))


def eval_geometry(width: int, height: int, image_size: int, crop_pct: float) -> tuple[tuple[int, int], Box]:
    """torchvision's ``Resize(resize_size)`` then ``CenterCrop(image_size)``.

    Returns:
        The resized ``(width, height)`` (shorter side ``resize_size``, longer side truncated as torchvision
        does) and the centre-crop box in the resized image.
    """
    size = resize_size(image_size, crop_pct)
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    # CenterCrop rounds the offset to the nearest pixel; images smaller than the crop are not padded here
    # (resize_size >= image_size whenever crop_pct <= 1, so the resized image always holds the crop).
    x = int(round((new[0] - image_size) / 2.0))
    y = int(round((new[1] - image_size) / 2.0))
    return new, (x, y, image_size, image_size)
