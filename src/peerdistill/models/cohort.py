"""A cohort of peer networks: independent networks, or branches on a shared trunk (DESIGN §3a).

Both topologies are one class. A branched cohort is N :class:`StagedNet` s whose stem and first
``shared`` stages are *the same modules*, so every peer is still a complete network (export, teacher
use) while the trunk is computed once per distinct input view and its gradients add up.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import PeerdistillError
from ..methods.base import PeerOutput
from .base import StagedNet, build_model


class Cohort(nn.Module):
    """N peer networks evaluated together.

    Args:
        nets: the peers (already sharing their trunk modules when ``shared > 0``).
        shared: number of leading stages (with the stem) shared by all peers; 0 = independent.
    """

    def __init__(self, nets: Sequence[StagedNet], shared: int = 0) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.shared = shared

    def __len__(self) -> int:
        return len(self.nets)

    @property
    def heads(self) -> list[nn.Linear]:
        return [net.classifier for net in self.nets]

    def forward(self, views: Sequence[Tensor], taps: Sequence[str] = ()) -> list[PeerOutput]:
        """Run peer i on ``views[i]``; a shared trunk runs once per distinct view object."""
        trunk: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        outs = []
        for net, x in zip(self.nets, views):
            if self.shared and id(x) in trunk:
                h, maps = trunk[id(x)]
                maps = dict(maps)
            else:
                h, maps = net.stem(x), {}
                for name, stage in zip(net.stage_names[:self.shared], net.stages[:self.shared]):
                    h = stage(h)
                    maps[name] = h
                if self.shared:
                    trunk[id(x)] = (h, dict(maps))
            for name, stage in zip(net.stage_names[self.shared:], net.stages[self.shared:]):
                h = stage(h)
                maps[name] = h
            emb = net.pool(h)
            keep = maps if "*" in taps else {k: maps[k] for k in taps}
            outs.append(PeerOutput(net.classifier(emb), emb, keep))
        return outs


def build_cohort(models: Sequence[str], n: int, num_classes: int, in_channels: int,
                 model_args: dict[str, object], topology: str = "independent",
                 split_after: str | None = None) -> Cohort:
    """Build ``n`` peers. ``models`` has one name (homogeneous) or ``n`` names (heterogeneous).

    For ``topology="branched"`` the peers share the stem and every stage up to ``split_after``
    (default: all stages but the last, the ONE / CL-ILR / OKDDip / PCL convention for CIFAR ResNets).
    """
    if len(models) not in (1, n):
        raise PeerdistillError(f"{len(models)} model names given for {n} peers; give one or {n}")
    names = list(models) * n if len(models) == 1 else list(models)
    nets = [build_model(name, num_classes, in_channels, **model_args) for name in names]
    if topology == "independent":
        return Cohort(nets)
    if topology != "branched":
        raise PeerdistillError(f"unknown topology {topology!r}")
    if len(set(names)) > 1:
        raise PeerdistillError("a branched cohort shares its trunk, so all peers must be the same model")
    stages = nets[0].stage_names
    if split_after is None:
        shared = len(stages) - 1
    elif split_after in stages[:-1]:
        shared = stages.index(split_after) + 1
    else:
        raise PeerdistillError(f"cannot split model {names[0]!r} after {split_after!r}; "
                               f"choose one of {', '.join(stages[:-1])}")
    for net in nets[1:]:
        net.stem = nets[0].stem
        for j in range(shared):
            net.stages[j] = nets[0].stages[j]
    return Cohort(nets, shared)
