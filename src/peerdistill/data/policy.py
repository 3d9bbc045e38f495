"""RandAugment and TrivialAugment on uint8 training batches, on the device (kornia's operations).

The ImageNet recipes of the field (timm's ``rand-m9-n2``, torchvision's ``TrivialAugmentWide``) draw the
operations per image. kornia's ``RandAugment`` / ``TrivialAugment`` draw them once per call, for the whole
batch; :class:`PolicyAugment` therefore draws each image's operations from the step's generator (for the
global batch under torchrun, like every other batched draw) and runs one kornia call per operation and
position on the images that drew it: at most ``n x operations`` calls per batch, each on a slice.
``select="batch"`` keeps kornia's one draw per call (fewer, larger calls; the whole batch shares its
operations). kornia draws each row's magnitude sign (RandAugment) or magnitude (TrivialAugment) from
torch's global generator: each call runs under a seed drawn from the step's generator and the global
state is restored afterwards, so a resumed run replays the same augmentation.

Placement (benchmarks/augmentation_speed.py --policies): the batched device call costs a fraction of the
per-image call a host worker would make, which is why the policy runs here, after the host's crop.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import PeerdistillError
from .host import host_values

KORNIA_EXTRA = "pip install 'peerdistill[autoaugment]'"  # the optional extra that brings kornia
POLICIES = ("randaugment", "trivialaugment")


def kornia_auto(what: str) -> Any:
    """``kornia.augmentation.auto``, or one line naming the extra that brings it."""
    try:
        import kornia.augmentation.auto as auto
    except ImportError:
        raise PeerdistillError(f"{what} needs kornia: {KORNIA_EXTRA}") from None
    return auto


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG for one call and restore it (and the device's) afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PolicyAugment:
    """RandAugment (Cubuk et al. 2020) or TrivialAugment (Müller & Hutter 2021) on a uint8 batch.

    Args:
        name: ``randaugment`` or ``trivialaugment``.
        n: RandAugment's number of operations per image (distinct, applied in the order drawn).
        m: RandAugment's magnitude, 1-29 on the 0-30 scale of kornia and torchvision (torchvision's default
            is 9; timm's ``m9`` is 9 on 0-10: ``m=27``).
        select: ``image``: operations drawn per image (the recipes' behaviour); ``batch``: one draw per batch.
    """

    def __init__(self, name: Literal["randaugment", "trivialaugment"], n: int = 2, m: int = 9,
                 select: Literal["image", "batch"] = "image") -> None:
        if name not in POLICIES:
            raise PeerdistillError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}")
        auto = kornia_auto(f"data.auto_augment={name}")
        self.name, self.n, self.m, self.select = name, n, m, select
        if name == "randaugment":
            self._table = list(auto.rand_augment.rand_augment.default_policy)
            self._make = lambda policy: auto.RandAugment(n=len(policy) if policy else n, m=m, policy=policy)
        else:
            self._table = list(auto.trivial_augment.trivial_augment.default_policy)
            self._make = lambda policy: auto.TrivialAugment(policy=policy)
        if not 1 <= n <= len(self._table):
            raise PeerdistillError(f"data.ra_n must be 1-{len(self._table)}, got {n}")
        self._ops: dict[int | None, Any] = {}
        self.shard = (0, 1)

    @property
    def per_image_ops(self) -> int:
        """Operations each image goes through."""
        return self.n if self.name == "randaugment" else 1

    def __call__(self, images: Tensor, gen: torch.Generator | None) -> Tensor:
        """uint8 ``(B, C, H, W)`` -> the augmented uint8 batch (grey images through their RGB copy)."""
        c = images.shape[1]
        x = images.float().div_(255.0)
        if c == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.select == "batch":
            out = self._call(None, x, gen)
        else:
            out = x.clone()  # written in place, group by group
            for ops in self._draw(images.shape[0], gen).unbind(1):  # one position at a time
                for k in ops.unique().tolist():
                    rows = (ops == k).nonzero().flatten().to(x.device)
                    out[rows] = self._call(k, out[rows], gen)
        return out[:, :c].mul(255.0).round_().clamp_(0, 255).to(torch.uint8)

    def _draw(self, b: int, gen: torch.Generator | None) -> Tensor:
        """(B, ops) operation indices per image, distinct within an image, for this rank's rows."""
        rank, world = self.shard
        keys = torch.rand(b * world, len(self._table), generator=gen, device=gen.device if gen else "cpu")
        ops = keys.argsort(dim=1)[:, :self.per_image_ops]  # n distinct, uniformly without replacement
        return (ops[rank::world] if world > 1 else ops).cpu()

    def _call(self, k: int | None, x: Tensor, gen: torch.Generator | None) -> Tensor:
        if k not in self._ops:
            self._ops[k] = self._make(None if k is None else [self._table[k]])
        seed = host_values(torch.randint(0, 2**62, (), generator=gen, device=gen.device if gen else "cpu"))
        rank = self.shard[0]
        # kornia draws for the rows it is given; under torchrun each process seeds its calls by its rank
        with seeded((seed + 7919 * rank) % 2**62, x.device):
            return self._ops[k](x)
