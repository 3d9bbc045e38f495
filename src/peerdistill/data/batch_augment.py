"""Batched augmentation on device tensors: random crop with zero padding, horizontal flip, an optional
RandAugment / TrivialAugment policy, cutout, normalisation. Every op draws per-sample randomness from the generator it is given."""
from __future__ import annotations

import torch
from torch import Tensor

from .host import to_device
from .policy import PolicyAugment


class BatchAugment:
    """Standard CIFAR-style training augmentation applied to a whole uint8 batch at once.

    Args:
        mean, std: per-channel normalisation in [0, 1] units.
        padding: zero padding of the random crop (0 disables cropping).
        flip: random horizontal flip with probability 0.5.
        cutout: side of one zeroed square per image (DeVries & Taylor 2017; 0 disables), applied
            after normalisation as in the reference implementation (the hole is 0 in normalised space).
        channels_last: return the float batch in channels_last memory format.
        policy: RandAugment / TrivialAugment on the uint8 images after the crop and flip (torchvision's order).

    Under DDP set ``shard = (rank, world_size)``: every random draw is then made for the global batch
    and this rank keeps rows ``rank::world_size`` -- the rows :class:`~peerdistill.data.loader.DeviceLoader`
    gives it -- so each sample is augmented exactly as in a one-process run with the same global batch.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4, flip: bool = True,
                 cutout: int = 0, channels_last: bool = True, policy: PolicyAugment | None = None) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.padding, self.flip, self.cutout, self.channels_last = padding, flip, cutout, channels_last
        self.policy = policy
        self.shard = (0, 1)

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> normalised float32 in the configured memory format."""
        if self.mean.device != x.device:  # moved once, not copied from the host every step
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        out = (x.float().div_(255.0) - self.mean) / self.std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=fmt)

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Augment a uint8 batch and return it normalised."""
        if self.padding:
            x = random_crop(x, self.padding, gen, self.shard)
        if self.flip:
            x = random_flip(x, gen, self.shard)
        if self.policy is not None:
            self.policy.shard = self.shard
            x = self.policy(x, gen)
        out = self.normalize(x)
        if self.cutout:
            out = cutout(out, self.cutout, gen, self.shard)
        return out


Shard = tuple[int, int]  # (rank, world_size)


def _rand(shape: tuple[int, ...], x: Tensor, gen: torch.Generator | None, high: int | None = None,
          shard: Shard = (0, 1)) -> Tensor:
    """Per-sample draws for the global batch (``shape[0] * world_size`` rows); this rank's rows."""
    dev = gen.device if gen is not None else x.device
    rank, world = shard
    full = (shape[0] * world, *shape[1:])
    t = torch.randint(high, full, generator=gen, device=dev) if high else torch.rand(full, generator=gen, device=dev)
    return to_device(t[rank::world] if world > 1 else t, x.device)


def random_crop(x: Tensor, padding: int, gen: torch.Generator | None = None, shard: Shard = (0, 1)) -> Tensor:
    """Per-sample random crop of the original size from the zero-padded batch, by index gathering."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = _rand((b,), x, gen, 2 * padding + 1, shard)
    ox = _rand((b,), x, gen, 2 * padding + 1, shard)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing over dims 0, 2, 3 with the slice on dim 1 -> (B, H, W, C).
    return padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: Tensor, gen: torch.Generator | None = None, shard: Shard = (0, 1)) -> Tensor:
    """Flip each image horizontally with probability 0.5."""
    mask = _rand((x.shape[0],), x, gen, shard=shard) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def cutout(x: Tensor, size: int, gen: torch.Generator | None = None, shard: Shard = (0, 1)) -> Tensor:
    """Zero one ``size`` x ``size`` square per image, centred uniformly and clipped to the image."""
    b, _, h, w = x.shape
    cy = _rand((b,), x, gen, h, shard)[:, None, None]
    cx = _rand((b,), x, gen, w, shard)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    # The reference slice [cy - size//2, cy + size//2) clipped to the image (DeVries & Taylor code).
    hole = (ys >= cy - size // 2) & (ys < cy + size // 2) & (xs >= cx - size // 2) & (xs < cx + size // 2)
    return x * (~hole)[:, None].to(x.dtype)
