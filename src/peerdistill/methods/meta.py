"""Hyper-gradients through unrolled SGD (DESIGN §3i: extra optimisation inside a step, L-MCL's meta step).

Everything works on dicts of parameter tensors with ``torch.func.functional_call``: the virtual steps
build new tensors, so the real parameters and buffers are never written and stay bit-identical.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import collectives

Params = dict[str, Tensor]


def sgd_step(theta: Params, grads: Params, velocity: Params | None, lr: float, momentum: float,
             weight_decay: float) -> tuple[Params, Params]:
    """One differentiable step of ``torch.optim.SGD`` (momentum, no dampening, not Nesterov):
    ``d = g + wd * p``, ``v = mu * v + d`` (``v = d`` on the first step), ``p <- p - lr * v``.
    A parameter without gradient still decays (its gradient counts as zero). Multi-tensor ``_foreach``
    ops (differentiable, as in ``torch.optim``): three ops per step instead of three per tensor."""
    keys = list(theta)
    ps = [theta[k] for k in keys]
    gs = [grads[k] if grads.get(k) is not None else torch.zeros_like(theta[k]) for k in keys]
    d = torch._foreach_add(gs, ps, alpha=weight_decay)
    v = d if velocity is None else torch._foreach_add(d, [velocity[k] for k in keys], alpha=momentum)
    new = torch._foreach_add(ps, v, alpha=-lr)
    return dict(zip(keys, new)), dict(zip(keys, v))


def unrolled_hypergradient(inner: Callable[[Params, Params], Tensor], outer: Callable[[Params], Tensor],
                           theta: Params, hparams: Params, times: int, lr: float, momentum: float,
                           weight_decay: float) -> Params:
    """Exact ``dF/dlambda`` of ``F(lambda) = outer(theta_{T+1})`` through the unrolled trajectory

    ``theta_{t+1} = SGD step of inner(theta_t, lambda)`` for ``t < T = times``, then one SGD step of
    ``outer`` (L-MCL: ``MetaSGD`` steps on the weighted contrastive loss, one on the CE, spec §3.2).
    The momentum starts from zero, as the code's rolled-back ``MetaSGD`` does at every meta step.

    Args:
        inner: ``inner(theta, lambda)`` -> scalar inner objective.
        outer: ``outer(theta)`` -> scalar outer objective.
        theta: the starting parameters (read, never written).
        hparams: the hyper-parameters lambda (read, never written).
        times: number of inner steps T.
        lr, momentum, weight_decay: the virtual SGD.

    Returns:
        ``{name: dF/dlambda}`` (zeros where F does not depend on a tensor).
    """
    lam = {k: h.detach().requires_grad_(True) for k, h in hparams.items()}
    th = {k: p.detach().requires_grad_(True) for k, p in theta.items()}
    vel: Params | None = None
    for t in range(times + 1):
        loss = inner(th, lam) if t < times else outer(th)
        keys = list(th)
        # create_graph: the next steps, and so F, depend on this gradient (second-order terms included)
        grads = torch.autograd.grad(loss, [th[k] for k in keys], create_graph=True, allow_unused=True)
        th, vel = sgd_step(th, {k: g for k, g in zip(keys, grads) if g is not None}, vel, lr, momentum,
                           weight_decay)
    final = outer(th)
    g = torch.autograd.grad(final, list(lam.values()), allow_unused=True)
    return {k: torch.zeros_like(h) if gi is None else gi.detach() for (k, h), gi in zip(lam.items(), g)}


def all_reduce_mean(grads: Params) -> Params:
    """Average gradients over the processes under torchrun (one flat all-reduce); identity otherwise."""
    if collectives.world_size() == 1:
        return grads
    flat = collectives.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads.values()]))
    out, i = {}, 0
    for k, g in grads.items():
        out[k] = flat[i:i + g.numel()].view_as(g)
        i += g.numel()
    return out


@torch.no_grad()
def nesterov_sgd_(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: float, momentum: float,
                  weight_decay: float) -> None:
    """In-place ``torch.optim.SGD(nesterov=True)`` step with explicit momentum buffers (zero-initialised,
    which equals torch's ``buf = d`` on the first step)."""
    for p, g, b in zip(params, grads, buffers):
        d = g + weight_decay * p
        b.mul_(momentum).add_(d)
        p.sub_(lr * (d + momentum * b))
