"""A cohort of peer networks: independent networks, or branches on a shared trunk (DESIGN §3a).

Both topologies are one class. A branched cohort is N :class:`StagedNet` s whose stem and first
``shared`` stages are *the same modules*, so every peer is still a complete network (export, teacher
use) while the trunk is computed once per distinct input view and its gradients add up.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..errors import PeerdistillError
from .base import PeerOutput, StagedNet, build_model


class Cohort(nn.Module):
    """N peer networks evaluated together.

    Args:
        nets: the peers (already sharing their trunk modules when ``shared > 0``).
        shared: number of leading stages (with the stem) shared by all peers; 0 = independent.
        fused: run a homogeneous independent cohort as one batched network (see :meth:`_fused_forward`).
        trunk_grad_scale: scale of the gradient a shared trunk receives back from the branches (1 = the
            plain sum of the branches' gradients); identity in the forward pass.
    """

    def __init__(self, nets: Sequence[StagedNet], shared: int = 0, fused: bool = False,
                 trunk_grad_scale: float = 1.0) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.shared = shared
        self.trunk_grad_scale = trunk_grad_scale
        if fused:
            check_fusable(self.nets, shared)
        self.fused = fused

    def __len__(self) -> int:
        return len(self.nets)

    @property
    def heads(self) -> list[nn.Linear]:
        return [net.classifier for net in self.nets]

    def forward(self, views: Sequence[Tensor | None], taps: Sequence[str] = ()) -> list[PeerOutput | None]:
        """Run peer i on ``views[i]`` (``None``: peer i is skipped and its output is ``None``).

        A shared trunk runs once per distinct view object.
        """
        if self.fused and all(v is not None for v in views):
            return self._fused_forward(views, taps)
        trunk: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        outs: list[PeerOutput | None] = []
        for net, x in zip(self.nets, views):
            if x is None:
                outs.append(None)
                continue
            if not self.shared:  # the model contract: every stage map, then pool and classify the last
                maps = net.forward_features(x)
                emb = net.pool(maps[net.stage_names[-1]])
                keep = maps if "*" in taps else {k: maps[k] for k in taps}
                outs.append(PeerOutput(net.classifier(emb), emb, keep))
                continue
            if id(x) in trunk:
                h, maps = trunk[id(x)]
                maps = dict(maps)
            else:
                h, maps = net.stem(x), {}
                for name, stage in zip(net.stage_names[:self.shared], net.stages[:self.shared]):
                    h = stage(h)
                    maps[name] = h
                if self.shared:
                    if self.trunk_grad_scale != 1.0 and h.requires_grad:
                        h = _GradScale.apply(h, self.trunk_grad_scale)
                    trunk[id(x)] = (h, dict(maps))
            for name, stage in zip(net.stage_names[self.shared:], net.stages[self.shared:]):
                h = stage(h)
                maps[name] = h
            emb = net.pool(h)
            keep = maps if "*" in taps else {k: maps[k] for k in taps}
            outs.append(PeerOutput(net.classifier(emb), emb, keep))
        return outs

    def _fused_forward(self, views: Sequence[Tensor], taps: Sequence[str]) -> list[PeerOutput]:
        """All peers as one network: ``torch.func.vmap`` over the peers' stacked weights.

        Convolutions become grouped convolutions, BatchNorm one normalisation over peers x channels, the
        heads one batched matmul, so each layer is one kernel for the whole cohort instead of one per
        peer. The peers' own parameters stay the trained tensors (stacking is differentiable, so
        gradients, the optimizer, DDP and checkpoints see the usual per-peer parameters); BatchNorm
        running statistics are updated on the stacked copy and written back. The result equals the
        per-peer loop up to floating-point summation order. Whether it is faster depends on the
        hardware: measure with ``peerdistill bench fused=true`` against ``fused=false``.
        """
        nets = list(self.nets)
        params = {k: torch.stack(ts) for k, ts in _gather(nets, "named_parameters").items()}
        buffers = {k: torch.stack(ts) for k, ts in _gather(nets, "named_buffers").items()}
        same = all(v is views[0] for v in views)
        x = views[0] if same else torch.stack(list(views))
        keep = tuple(nets[0].stage_names) if "*" in taps else tuple(taps)
        peer = _Tapped(nets[0], keep)

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            return functional_call(peer, ({f"net.{k}": v for k, v in p.items()},
                                          {f"net.{k}": v for k, v in b.items()}), (xi,))

        logits, emb, maps = vmap(one, in_dims=(0, 0, None if same else 0), randomness="different")(
            params, buffers, x)
        if self.training:  # write the updated running statistics back, as a few multi-tensor copies
            with torch.no_grad():
                names = list(buffers)
                torch._foreach_copy_([net.get_buffer(k) for k in names for net in nets],
                                     [v for k in names for v in buffers[k].unbind(0)])
        return [PeerOutput(logits[i], emb[i], {k: v[i] for k, v in maps.items()}) for i in range(len(nets))]


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``scale`` on its way back."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _Tapped(nn.Module):
    """One peer's forward returning (logits, embedding, requested maps): the function vmapped over peers."""

    def __init__(self, net: StagedNet, keep: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.keep = net, keep

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        maps = self.net.forward_features(x)
        emb = self.net.pool(maps[self.net.stage_names[-1]])
        return self.net.classifier(emb), emb, {k: maps[k] for k in self.keep}


def _gather(nets: Sequence[nn.Module], kind: str) -> dict[str, list[Tensor]]:
    out: dict[str, list[Tensor]] = {}
    for net in nets:
        for name, t in getattr(net, kind)():
            out.setdefault(name, []).append(t)
    return out


def check_fusable(nets: Sequence[nn.Module], shared: int) -> None:
    """A fused cohort needs independent peers of one architecture (same parameter and buffer shapes)."""
    if shared:
        raise PeerdistillError("fused=true needs an independent cohort; this method shares a trunk between peers")
    if len(nets) < 2:
        raise PeerdistillError("fused=true needs at least 2 peers")
    shapes = [[(n, tuple(t.shape)) for n, t in [*net.named_parameters(), *net.named_buffers()]] for net in nets]
    if any(s != shapes[0] for s in shapes[1:]) or len({type(net) for net in nets}) > 1:
        raise PeerdistillError("fused=true needs every peer to be the same model")


def build_cohort(models: Sequence[str], n: int, num_classes: int, in_channels: int,
                 model_args: dict[str, object], topology: str = "independent",
                 split_after: str | None = None, fused: bool = False, trunk_grad_scale: float = 1.0) -> Cohort:
    """Build ``n`` peers. ``models`` has one name (homogeneous) or ``n`` names (heterogeneous).

    For ``topology="branched"`` the peers share the stem and every stage up to ``split_after``
    (default: all stages but the last, the ONE / CL-ILR / OKDDip / PCL convention for CIFAR ResNets),
    and the trunk's gradient is the branches' times ``trunk_grad_scale``.
    """
    if len(models) not in (1, n):
        raise PeerdistillError(f"{len(models)} model names given for {n} peers; give one or {n}")
    names = list(models) * n if len(models) == 1 else list(models)
    nets = [build_model(name, num_classes, in_channels, **model_args) for name in names]
    if topology == "independent":
        return Cohort(nets, fused=fused)
    if topology != "branched":
        raise PeerdistillError(f"unknown topology {topology!r}")
    if len(set(names)) > 1:
        raise PeerdistillError("a branched cohort shares its trunk, so all peers must be the same model")
    return branch(nets, split_after, names[0], fused, trunk_grad_scale)


def branch(nets: Sequence[StagedNet], split_after: str | None, name: str, fused: bool = False,
           trunk_grad_scale: float = 1.0) -> Cohort:
    """A branched cohort of ``nets`` (one architecture): the stem and the stages up to ``split_after``
    (default: all but the last) of ``nets[0]`` become every peer's; ``nets`` are changed in place."""
    if not all(getattr(net, "splittable", True) for net in nets):
        raise PeerdistillError(f"this method shares a trunk between peers (a branched cohort), but {name!r} is an "
                               f"adapted nn.Module whose layers cannot be split into a shared stem and stages")
    if len({type(net) for net in nets}) > 1 or len({net.stage_names for net in nets}) > 1:
        raise PeerdistillError("a branched cohort shares its trunk, so all peers must be the same model")
    stages = nets[0].stage_names
    if split_after is None:
        shared = len(stages) - 1
    elif split_after in stages[:-1]:
        shared = stages.index(split_after) + 1
    else:
        raise PeerdistillError(f"cannot split model {name!r} after {split_after!r}; "
                               f"choose one of {', '.join(stages[:-1])}")
    for net in nets[1:]:
        net.stem = nets[0].stem
        for j in range(shared):
            net.stages[j] = nets[0].stages[j]
    return Cohort(nets, shared, fused, trunk_grad_scale)
