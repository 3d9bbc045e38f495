"""Streaming image data: lazy file sets and webdataset shards, the ImageNet protocol's crops on the host,
worker processes that hand uint8 batches to the device, and packing folders into shards (DESIGN §4).

Nothing here decodes at import time: ``simplejpeg`` and ``Pillow`` (``pip install 'peerdistill[imagenet]'``)
are imported when the first image is decoded.
"""
from .codec import DecodeError, decode, image_size
from .loader import HostBatch, StreamDataset, StreamLoader, sequential_rows
from .protocol import central_box, eval_geometry, resize_size, rrc_box, sample_rng
from .sets import IMAGE_EXTENSIONS, FolderSet, LazySet, scan_folder
from .shards import ShardSet, open_shards
from .transform import HostTransform

__all__ = ["DecodeError", "FolderSet", "HostBatch", "HostTransform", "IMAGE_EXTENSIONS", "LazySet", "ShardSet",
           "StreamDataset", "StreamLoader", "central_box", "decode", "eval_geometry", "image_size",
           "open_shards", "resize_size", "rrc_box", "sample_rng", "scan_folder", "sequential_rows"]
