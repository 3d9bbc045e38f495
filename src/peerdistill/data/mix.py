"""Mixed-sample augmentations and the mix record that keeps every target correct under mixing.

A mixed sample ``i`` is ``sum_k pixel_weights[k, i] * x[perms[k, i]]`` and its label (or any other
per-sample tensor: one-hot labels, probabilities, features) is ``sum_k weights[k, i] * t[perms[k, i]]``.
MixUp and CutMix have two components (the sample itself and a partner); Cut^nMix-style mixers have more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..params import Positive, Probability
from ..registry import Registry
from .host import host_values, to_device


@dataclass
class MixRecord:
    """How a batch was mixed.

    Attributes:
        perms: (K, B) source index of each component (``perms[0]`` is the identity for mixers that
            keep each sample as its own first component).
        weights: (K, B) label weight of each component (sums to 1 over K).
        pixel_weights: (K, B, 1, H, W) or (K, B, 1, 1, 1) pixel weight of each component.
    """

    perms: Tensor
    weights: Tensor
    pixel_weights: Tensor

    def mix(self, t: Tensor) -> Tensor:
        """Mix any per-sample tensor (B, ...) with the label weights."""
        w = self.weights.to(t.dtype).view(*self.weights.shape, *([1] * (t.dim() - 1)))
        return (w * t[self.perms]).sum(0)

    def mix_images(self, x: Tensor) -> Tensor:
        """Mix an image batch (B, C, H, W) with the pixel weights (any view of the same samples)."""
        out = (self.pixel_weights.to(x.dtype) * x[self.perms]).sum(0)
        return out.contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


class Mixer:
    """Base class: ``mixer(x, gen) -> (mixed x, MixRecord)`` or ``(x, None)`` when it skips a batch.

    :meth:`draw` makes the record alone, so one draw can mix several views of the same samples alike
    (``record.mix_images(view)``). ``ctx`` (a :class:`~peerdistill.data.views.ViewContext`) gives mixers
    that score candidates (CutMixPick) no-grad access to the teacher and the peers; others ignore it.
    """

    prob: float = 1.0

    def draw(self, x: Tensor, gen: torch.Generator | None = None, ctx: object = None) -> MixRecord | None:
        if self.prob < 1.0 and host_values(torch.rand((), generator=gen)) >= self.prob:
            return None
        return self.record(x.shape, x.device, gen)

    def __call__(self, x: Tensor, gen: torch.Generator | None = None,
                 ctx: object = None) -> tuple[Tensor, MixRecord | None]:
        rec = self.draw(x, gen, ctx)
        return (x, None) if rec is None else (rec.mix_images(x), rec)

    def record(self, shape: torch.Size, device: torch.device, gen: torch.Generator | None) -> MixRecord:
        raise NotImplementedError

    def check(self, world: int) -> None:
        """Raise a one-line error if this mixer cannot run in ``world`` processes (default: it can)."""


MIXERS: Registry[Mixer] = Registry("mixer")


def beta(alpha: float, gen: torch.Generator | None) -> float:
    """One Beta(alpha, alpha) draw, reproducible from the seeded torch generator."""
    seed = host_values(torch.randint(0, 2**62, (), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def random_perm(b: int, gen: torch.Generator | None, device: torch.device, derangement: bool = False) -> Tensor:
    """A random permutation of the batch; with ``derangement`` no sample is paired with itself."""
    while True:
        perm = torch.randperm(b, generator=gen)
        if not derangement or b < 2 or not host_values((perm == torch.arange(b)).any()):
            return to_device(perm, device)


def two_way(perm: Tensor, lam: float, pixel_self: Tensor, device: torch.device) -> MixRecord:
    b = perm.numel()
    ident = torch.arange(b, device=device)
    weights = to_device(torch.tensor([lam, 1.0 - lam]), device)[:, None].expand(2, b)
    pixel = torch.stack([pixel_self, 1.0 - pixel_self])
    return MixRecord(torch.stack([ident, perm]), weights.contiguous(), pixel.expand(2, b, *pixel.shape[2:]))


@MIXERS.register("mixup")
class MixUp(Mixer):
    """MixUp (Zhang et al. 2018): x = lam x_i + (1 - lam) x_perm(i), lam ~ Beta(alpha, alpha).

    Args:
        alpha: Beta parameter (1.0 as in Good-DA / the CIFAR MixUp runs).
        prob: probability of mixing a batch.
        derangement: never pair a sample with itself.
    """

    def __init__(self, alpha: Positive = 1.0, prob: Probability = 1.0, derangement: bool = False) -> None:
        self.alpha, self.prob, self.derangement = alpha, prob, derangement

    def record(self, shape: torch.Size, device: torch.device, gen: torch.Generator | None) -> MixRecord:
        lam = beta(self.alpha, gen)
        perm = random_perm(shape[0], gen, device, self.derangement)
        return two_way(perm, lam, torch.full((1, 1, 1, 1), lam, device=device), device)


def rand_box(h: int, w: int, lam: float, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """CutMix box: side ratio sqrt(1 - lam), uniform centre, clipped to the image. Returns y1, y2, x1, x2."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = host_values(torch.randint(0, 1 << 30, (2,), generator=gen) % torch.tensor([h, w]))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


@MIXERS.register("cutmix")
class CutMix(Mixer):
    """CutMix (Yun et al. 2019): paste a box of a partner image; lam = 1 - box area / image area
    recomputed after clipping the box, so the label weights equal the true pixel fractions.

    Args:
        alpha: Beta parameter of lam (1.0 in the CutMix paper's CIFAR setting).
        prob: probability of mixing a batch (0.5 in the official CIFAR runs).
        derangement: never pair a sample with itself (Good-DA's CutMix does this).
    """

    def __init__(self, alpha: Positive = 1.0, prob: Probability = 0.5, derangement: bool = False) -> None:
        self.alpha, self.prob, self.derangement = alpha, prob, derangement

    def record(self, shape: torch.Size, device: torch.device, gen: torch.Generator | None) -> MixRecord:
        b, _, h, w = shape
        y1, y2, x1, x2 = rand_box(h, w, beta(self.alpha, gen), gen)
        keep = torch.ones(1, 1, h, w, device=device)
        keep[..., y1:y2, x1:x2] = 0.0
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        perm = random_perm(b, gen, device, self.derangement)
        return two_way(perm, lam, keep, device)
