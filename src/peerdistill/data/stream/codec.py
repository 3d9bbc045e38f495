"""Decoding encoded images into uint8 arrays, and the antialiased resize of a crop.

JPEGs go through ``simplejpeg`` (libjpeg-turbo) when it is installed: it reads the header without
decoding, decodes straight into a numpy array, and can decode at 1/2, 1/4 or 1/8 of the size in the DCT
(libjpeg's scaled IDCT), which the callers use only where the crop will be shrunk by at least that much
anyway. Everything else (PNG, WebP, BMP, CMYK JPEGs) and every JPEG when ``simplejpeg`` is missing goes
through Pillow (whose ``draft`` gives the same reduced-size decoding). The resize is torch's uint8
antialiased bilinear kernel: the same filter as Pillow's ``BILINEAR`` resize (224-px crops differ by
0.04 grey levels on average) at a quarter of its cost (benchmarks/decode_options.py).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_JPEG_MAGIC = b"\xff\xd8"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError)


class DecodeError(ValueError):
    """An image that cannot be decoded (truncated, corrupt, not an image)."""


def _simplejpeg():  # noqa: ANN202 - an optional module or None
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _pil_open(data: bytes):  # noqa: ANN202 - a PIL image
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data))
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise DecodeError(str(e) or type(e).__name__) from None


def jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG simplejpeg can decode to RGB/grey, else None (use Pillow)."""
    sj = _simplejpeg()
    if sj is None or not data.startswith(_JPEG_MAGIC):
        return None
    try:
        h, w, colorspace, _ = sj.decode_jpeg_header(data)
    except ValueError:
        return None  # let Pillow try, and name the problem if it cannot either
    return (w, h) if colorspace in ("YCbCr", "Gray", "RGB") else None


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, from its header alone."""
    size = jpeg_header(data)
    if size is not None:
        return size
    with _pil_open(data) as im:
        return im.size


def reduction(crop_sizes: list[tuple[int, int]], out_size: tuple[int, int]) -> int:
    """The largest DCT reduction (1, 2, 4 or 8) that leaves every crop at least ``out_size``: decoding
    smaller then never upsamples a crop that the full-size path would have shrunk."""
    factor = min(min(w / out_size[0], h / out_size[1]) for w, h in crop_sizes)
    for r in (8, 4, 2):
        if factor >= r:
            return r
    return 1


def decode(data: bytes, channels: int = 3, reduce: int = 1,
           jpeg_size: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Decode an encoded image into uint8 ``(H, W, channels)``.

    Args:
        data: The file's bytes.
        channels: 3 (RGB) or 1 (grey).
        reduce: Decode JPEGs at ``1 / reduce`` of the size (1, 2, 4, 8): the output is
            ``ceil(W / reduce) x ceil(H / reduce)``. Other formats ignore it.
        jpeg_size: What :func:`jpeg_header` gave for these bytes, when it gave a size (saves reading the
            header again); None: read it here.

    Returns:
        The pixels and the reduction actually applied (1 for non-JPEG images).

    Raises:
        DecodeError: the bytes are not a decodable image (truncated, corrupt, another format).
    """
    sj = _simplejpeg()
    size = jpeg_size or jpeg_header(data)
    if sj is not None and size is not None:
        w, h = size
        try:
            # The accurate IDCT and chroma upsampling: the fast ones save ~7 % of the decode and move a
            # 224-px crop by 3 grey levels on average (benchmarks/decode_options.py).
            arr = sj.decode_jpeg(data, "RGB" if channels == 3 else "GRAY", min_height=-(-h // reduce),
                                 min_width=-(-w // reduce), strict=True)
        except ValueError as e:
            raise DecodeError(str(e)) from None
        return arr.reshape(arr.shape[0], arr.shape[1], channels), (reduce if arr.shape[1] < w else 1)
    return _decode_pil(data, channels, reduce)


def _decode_pil(data: bytes, channels: int, reduce: int) -> tuple[np.ndarray, int]:
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with _pil_open(data) as im:
        full = im.size
        if reduce > 1 and im.format == "JPEG":
            # Pillow picks the largest power of two <= min(W // w, H // h): floor sizes make that ``reduce``.
            im.draft(mode, (max(1, full[0] // reduce), max(1, full[1] // reduce)))
        try:
            arr = np.asarray(im if im.mode == mode else im.convert(mode))  # read-only, never written
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
            raise DecodeError(str(e) or type(e).__name__) from None
    applied = reduce if arr.shape[1] < full[0] else 1
    return arr.reshape(arr.shape[0], arr.shape[1], channels), applied


def _tensor(pixels: np.ndarray) -> Tensor:
    if pixels.flags.writeable:
        return torch.from_numpy(pixels)
    with warnings.catch_warnings():  # Pillow's pixels are read-only; nothing here writes into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


def resize(pixels: np.ndarray | Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of uint8 ``(h, w, C)`` pixels (any strides) to ``size = (W, H)``.

    Returns:
        uint8 ``(H, W, C)`` (a view of torch's output; copy it where it must persist).
    """
    t = _tensor(pixels) if isinstance(pixels, np.ndarray) else pixels
    if (t.shape[1], t.shape[0]) == tuple(size):
        return t
    # (1, C, h, w) in channels-last storage: a crop is a strided view, and copying it into a dense
    # channels-last block first (cheap: one pass over the crop) selects torch's vectorised uint8 kernel and
    # gives an output already in HWC order -- together about 3x faster than resizing the view directly.
    x = t.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0)
