"""Views: how one training batch becomes the inputs the networks see (DESIGN §3d).

A :class:`View` is one normalised input batch with the labels, dataset indices and mix record that
belong to its rows. A method turns a batch into :class:`Views`: one view per peer (the same object for
peers that share it, so a shared trunk runs once per distinct view) plus named extra inputs that the
engine also runs every peer on -- with gradient (Good-DA's extra augmented batch) or without (CS-KD's
same-class partners, re-running a peer on another peer's mixed input).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .mix import Mixer, MixRecord


@dataclass
class View:
    """One input batch as a network sees it.

    Attributes:
        x: (B, C, H, W) normalised float images.
        labels: (B,) labels of the rows (before mixing).
        index: (B,) dataset indices of the rows.
        mix: how the rows were mixed (``None``: not mixed).
    """

    x: Tensor
    labels: Tensor
    index: Tensor
    mix: MixRecord | None = None

    def soft_targets(self, num_classes: int) -> Tensor:
        """(B, K) one-hot labels, mixed exactly as the pixels were."""
        onehot = torch.nn.functional.one_hot(self.labels, num_classes).float()
        return onehot if self.mix is None else self.mix.mix(onehot)


@dataclass
class Extra:
    """Extra inputs the engine runs every peer on: ``views[i]`` for peer i (``None``: peer i skips it)."""

    views: list[View | None]
    grad: bool = False


@dataclass
class Views:
    """What ``Method.make_views`` returns.

    Attributes:
        peers: the view each peer trains on (one per peer; repeat an object to share it).
        extra: named extra inputs; their outputs reach the method as ``rec.extra[name][i]``.
    """

    peers: list[View]
    extra: dict[str, Extra] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        """Every distinct input tensor of the step (each one once), e.g. for a frozen teacher."""
        seen: dict[int, Tensor] = {}
        for v in [*self.peers, *(v for e in self.extra.values() for v in e.views if v is not None)]:
            seen.setdefault(id(v.x), v.x)
        return list(seen.values())


@dataclass
class ViewContext:
    """What ``Method.make_views`` may use to build the views of one batch.

    Attributes:
        augment: uint8 (B, C, H, W) -> normalised, randomly augmented float batch (draws from ``gen``).
        normalize: uint8 -> normalised float batch, no augmentation.
        mixer: the configured mixer, or ``None``.
        gen: the step's seeded CPU generator (every random draw comes from it, so resume is exact).
        n_peers: cohort size.
        teacher: no-grad logits of the frozen teacher on a normalised batch (``None`` without a teacher).
        peer: ``peer(i, x)``: no-grad logits of peer i on a normalised batch, in its current mode.
        shard: ``(rank, world_size)``: per-image draws are made for the global batch and each process keeps
            its slice (as the standard augmentation does), so results do not depend on the process count.
    """

    augment: Callable[[Tensor], Tensor]
    normalize: Callable[[Tensor], Tensor]
    mixer: Mixer | None
    gen: torch.Generator
    n_peers: int
    teacher: Callable[[Tensor], Tensor] | None = None
    peer: Callable[[int, Tensor], Tensor] | None = None
    shard: tuple[int, int] = (0, 1)

    def mixed(self, view: View) -> View:
        """``view`` mixed by one fresh draw of the mixer (itself when there is no mixer or it skips)."""
        if self.mixer is None:
            return view
        x, rec = self.mixer(view.x, self.gen, self)
        return view if rec is None else View(x, view.labels, view.index, rec)
