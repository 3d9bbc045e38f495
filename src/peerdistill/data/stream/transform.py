"""The per-sample host transform: encoded bytes -> V uint8 crops of one decoded image.

Training: V independent RandomResizedCrops (one per view, e.g. one per peer) of a single decode, each
resized to ``image_size`` (and mirrored with probability 1/2 when ``flip``). When every crop will be
shrunk by 2x or more the JPEG is decoded at reduced size in the DCT first (never below the size any crop
needs). Evaluation: the image resized so its shorter side is ``image_size / crop_pct``, then the centre
``image_size`` square (V = 1). Every draw comes from the :func:`~.protocol.sample_rng` stream of
``(seed, epoch, sample index, view)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .codec import decode, image_size, jpeg_header, reduction, resize
from .protocol import Box, SampleDraws, eval_geometry, rrc_box


@dataclass(frozen=True)
class HostTransform:
    """What the host does to one sample.

    Attributes:
        image_size: Side of the square output.
        train: RandomResizedCrop views (True) or resize + centre crop (False).
        views: Crops per sample in training (V); evaluation always gives 1.
        scale: RandomResizedCrop's area range.
        ratio: RandomResizedCrop's aspect-ratio range.
        crop_pct: Evaluation: the shorter side is resized to ``floor(image_size / crop_pct)``.
        flip: Mirror each training view with probability 1/2 on the host (off: leave flips to the device).
        channels: 3 (RGB) or 1 (grey).
        seed: Base seed of every draw.
    """

    image_size: int = 224
    train: bool = True
    views: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_pct: float = 0.875
    flip: bool = False
    channels: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.views < 1 or self.channels not in (1, 3):
            raise ValueError(f"bad transform {self}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"bad RandomResizedCrop ranges scale={self.scale} ratio={self.ratio}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def out_views(self) -> int:
        """Views in the output: ``views`` in training, 1 in evaluation."""
        return self.views if self.train else 1

    def boxes(self, width: int, height: int, epoch: int, index: int) -> list[tuple[Box, bool]]:
        """Each training view's crop box and whether it is mirrored."""
        out = []
        for v in range(self.views):
            rng = _DRAWS.at(self.seed, epoch, index, v)
            box = rrc_box(width, height, rng, self.scale, self.ratio)
            out.append((box, bool(self.flip and rng.random() < 0.5)))
        return out

    def apply(self, data: bytes, epoch: int, index: int, out: Tensor | np.ndarray) -> None:
        """Decode ``data`` and write its views into ``out``: uint8 ``(V, image_size, image_size, C)`` (a
        tensor, or its numpy view: a batch's worth of per-sample ``Tensor.numpy()`` calls costs 1 ms).

        Raises:
            DecodeError: the bytes are not a decodable image.
        """
        header = jpeg_header(data)
        width, height = header or image_size(data)
        out = out if isinstance(out, np.ndarray) else out.numpy()
        if self.train:
            self._train(data, width, height, header, epoch, index, out)
        else:
            self._eval(data, width, height, header, out[0])

    def _train(self, data: bytes, width: int, height: int, header: tuple[int, int] | None, epoch: int,
               index: int, out: np.ndarray) -> None:
        views = self.boxes(width, height, epoch, index)
        size = (self.image_size, self.image_size)
        pixels, r = decode(data, self.channels, reduction([(b[2], b[3]) for b, _ in views], size), header)
        for v, ((x, y, w, h), mirrored) in enumerate(views):
            # Box corners in the reduced image: off by at most r/2 source pixels of a crop >= 2r * size wide.
            x0, y0 = min(round(x / r), pixels.shape[1] - 1), min(round(y / r), pixels.shape[0] - 1)
            crop = pixels[y0:max(round((y + h) / r), y0 + 1), x0:max(round((x + w) / r), x0 + 1)]
            img = crop if (crop.shape[1], crop.shape[0]) == size else resize(crop, size).numpy()
            out[v] = img[:, ::-1] if mirrored else img  # numpy copies: a few µs less than torch ops per view

    def _eval(self, data: bytes, width: int, height: int, header: tuple[int, int] | None,
              out: np.ndarray) -> None:
        (nw, nh), (x, y, w, h) = eval_geometry(width, height, self.image_size, self.crop_pct)
        pixels, _ = decode(data, self.channels, reduction([(width, height)], (nw, nh)), header)
        out[...] = resize(pixels, (nw, nh))[y:y + h, x:x + w].numpy()


_DRAWS = SampleDraws()  # one per process: workers and the training process each draw one view at a time


def empty_views(n: int, t: HostTransform) -> Tensor:
    """Uninitialised uint8 ``(n, V, image_size, image_size, C)`` for a batch of ``n`` samples."""
    return torch.empty(n, t.out_views, t.image_size, t.image_size, t.channels, dtype=torch.uint8)
