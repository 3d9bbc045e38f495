"""Cut^nMix: n CutMix patches from n partner images, with labels from the pixels that stay visible.

A **reconstruction**: the Cut^nMix paper (Shen et al., arXiv 2206.12370) names the mixer but its
definition was not retrievable (spec §4). This is reading H1 there: CutMix applied n times. Each
patch is a CutMix box (Yun et al. 2019): ``lam_k ~ Beta(alpha, alpha)``, side ratio ``sqrt(1 - lam_k)``,
uniform centre, clipped to the image; patch k shows partner image ``perms[k + 1]``; later patches
overwrite earlier ones. Each component's label weight is the fraction of pixels it shows in the *final*
mask, so labels stay exact when patches overlap. With ``n=1`` (and the default options) it is CutMix,
draw for draw.

Every random decision is a host draw from the step's CPU generator; the masks are built on the device
from the (n, rows, 4) box corners, so making a record never waits for the GPU.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import PeerdistillError
from ..params import Positive, PositiveInt, Probability
from .host import host_values, to_device
from .mix import MIXERS, Mixer, MixRecord, beta, rand_box, random_perm


@MIXERS.register("cutnmix")
class CutNMix(Mixer):
    """Cut^nMix (reconstruction): paste n CutMix boxes from n partner images; each component's label
    weight is the fraction of pixels it shows after later patches overwrote earlier ones.

    Args:
        n: number of patches (and partner images); ``n=1`` is CutMix.
        alpha: Beta parameter of each patch's lam (area share 1 - lam before clipping), as CutMix's.
        prob: probability of mixing a batch (0.5, CutMix's official CIFAR setting).
        partners: ``independent``: each patch has its own random permutation (a sample's partners may
            repeat, and may be itself unless ``derangement``); ``distinct``: every sample's n partners
            are n different images (never itself with ``derangement``); ``same``: one permutation for
            every patch (n boxes of one partner: more, smaller cuts, not more images).
        derangement: never paste a sample into itself.
        boxes: ``batch``: one set of n boxes for the whole batch, as CutMix draws one box per batch;
            ``sample``: independent boxes per sample (per-sample masks and label weights).
    """

    def __init__(self, n: PositiveInt = 2, alpha: Positive = 1.0, prob: Probability = 0.5,
                 partners: Literal["independent", "distinct", "same"] = "independent",
                 derangement: bool = False, boxes: Literal["batch", "sample"] = "batch") -> None:
        self.n, self.alpha, self.prob = n, alpha, prob
        self.partners, self.derangement, self.boxes = partners, derangement, boxes

    def record(self, shape: torch.Size, device: torch.device, gen: torch.Generator | None) -> MixRecord:
        b, _, h, w = shape
        # Same draw order as CutMix (lam, box, then the permutation), so n=1 reproduces it exactly.
        corners = self._batch_boxes(h, w, gen) if self.boxes == "batch" else self._sample_boxes(b, h, w, gen)
        perms = self._partner_perms(b, gen, device)  # (n, B)
        pixel = visible_masks(to_device(corners, device), h, w)  # (K, rows, 1, H, W), rows = 1 or B
        k = self.n + 1
        weights = pixel.mean((2, 3, 4))  # (K, rows): the visible-pixel fraction of each component
        ident = torch.arange(b, device=device)[None]
        return MixRecord(torch.cat([ident, perms]), weights.expand(k, b).contiguous(), pixel.expand(k, b, 1, h, w))

    def _batch_boxes(self, h: int, w: int, gen: torch.Generator | None) -> Tensor:
        """(n, 1, 4) corners y1, y2, x1, x2 of n CutMix boxes shared by the batch."""
        return torch.tensor([[rand_box(h, w, beta(self.alpha, gen), gen)] for _ in range(self.n)])

    def _sample_boxes(self, b: int, h: int, w: int, gen: torch.Generator | None) -> Tensor:
        """(n, B, 4) corners of independent boxes per sample, by the same rule as :func:`rand_box`."""
        seed = host_values(torch.randint(0, 2**62, (), generator=gen))
        lam = torch.from_numpy(np.random.default_rng(seed).beta(self.alpha, self.alpha, (self.n, b)))
        cut = torch.sqrt(1.0 - lam)
        half_h, half_w = (h * cut).floor().long() // 2, (w * cut).floor().long() // 2  # int(h * cut) // 2
        centre = torch.randint(0, 1 << 30, (self.n, b, 2), generator=gen) % torch.tensor([h, w])
        cy, cx = centre.unbind(-1)
        return torch.stack([(cy - half_h).clamp_min(0), (cy + half_h).clamp_max(h),
                            (cx - half_w).clamp_min(0), (cx + half_w).clamp_max(w)], -1)

    def _partner_perms(self, b: int, gen: torch.Generator | None, device: torch.device) -> Tensor:
        """(n, B) partner of every sample for each patch."""
        if self.partners == "same":
            return random_perm(b, gen, device, self.derangement)[None].expand(self.n, b)
        if self.partners == "independent":
            return torch.stack([random_perm(b, gen, device, self.derangement) for _ in range(self.n)])
        return to_device(distinct_perms(b, self.n, self.derangement, gen), device)


def distinct_perms(b: int, n: int, derangement: bool, gen: torch.Generator | None) -> Tensor:
    """(n, B) permutations that give every sample n different partners.

    Sample ``sigma[t]`` of a random ordering ``sigma`` gets partners ``sigma[(t + s_k) % B]`` for n
    distinct shifts ``s_k`` (from 1..B-1 with ``derangement``, so never itself). For each sample the
    partners are a uniformly random ordered set of distinct images; each row is a permutation.
    """
    low = 1 if derangement else 0
    if n > b - low:
        raise PeerdistillError(f"mixer 'cutnmix' needs a batch of at least {n + low} images for {n} distinct "
                               f"partners per sample, got {b}")
    sigma = torch.randperm(b, generator=gen)
    shifts = torch.randperm(b - low, generator=gen)[:n] + low  # (n,)
    perms = torch.empty(n, b, dtype=torch.long)
    perms[:, sigma] = sigma[(torch.arange(b)[None] + shifts[:, None]) % b]
    return perms


def visible_masks(corners: Tensor, h: int, w: int) -> Tensor:
    """(K, rows, 1, H, W) 0/1 mask of the pixels each component shows: component 0 (the sample itself)
    wherever no patch lies, component k where patch k is the last patch covering the pixel.

    Args:
        corners: (n, rows, 4) integer box corners y1, y2, x1, x2 (exclusive ends), on the target device.
    """
    n, dev = corners.shape[0], corners.device
    y = torch.arange(h, device=dev).view(1, 1, h, 1)
    x = torch.arange(w, device=dev).view(1, 1, 1, w)
    y1, y2, x1, x2 = (c[..., None, None] for c in corners.unbind(-1))  # each (n, rows, 1, 1)
    inside = (y >= y1) & (y < y2) & (x >= x1) & (x < x2)  # (n, rows, H, W)
    ranks = torch.arange(1, n + 1, device=dev).view(n, 1, 1, 1)
    owner = (inside * ranks).amax(0)  # (rows, H, W): the last patch wins, 0 = no patch
    return (owner[None] == torch.arange(n + 1, device=dev).view(n + 1, 1, 1, 1)).float().unsqueeze(2)
