"""White-box L-infinity attacks: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018).

An attack gets the *attacked function* ``f: x -> (B, K)`` scores (logits or log-probabilities: the
cross-entropy of log-probabilities is the same as of logits) and images ``x`` in the space the budget
``eps`` is measured in. peerdistill attacks uint8 -> [0, 1] images and normalises inside ``f``, so
``eps = 8/255`` means eight grey levels (:mod:`peerdistill.evaluation.robust`); the SD-Dropout authors'
setting attacks normalised tensors instead (:func:`fgsm_normalised`, see the docs).
Every attack runs in float32 and leaves the parameters' gradients untouched.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Attacked = Callable[[Tensor], Tensor]  # (B, C, H, W) -> (B, K) logits or log-probabilities


def _full(x: Tensor) -> Tensor:
    """Detached, in float32 at least (half-precision inputs are promoted; float64 stays)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def input_gradient(f: Attacked, x: Tensor, y: Tensor) -> Tensor:
    """(B, C, H, W) gradient of the summed cross-entropy ``sum_i CE(f(x)_i, y_i)`` with respect to ``x``.

    The sum, not the mean, so a sample's gradient does not shrink with the batch size (only its sign
    is used by the attacks, but ODIN and tests read it too). ``torch.autograd.grad`` touches no
    parameter's ``.grad``.
    """
    x = _full(x).requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(f(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(f: Attacked, x: Tensor, y: Tensor, eps: float,
         clip: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """One step ``x + eps * sign(grad_x CE(f(x), y))``, clipped to ``clip`` (``None``: unclipped).

    Args:
        f: the attacked function.
        x: (B, C, H, W) clean inputs.
        y: (B,) labels the loss is raised for (true labels, or the model's own predictions to avoid
            label leaking, as IBM ART does when no labels are given).
        eps: L-infinity budget in the units of ``x``.
        clip: the valid input range.
    """
    adv = _full(x) + eps * input_gradient(f, x, y).sign()
    return adv.clamp(*clip) if clip is not None else adv


def fgsm_normalised(f: Attacked, x: Tensor, eps: float, mean: Tensor, std: Tensor) -> Tensor:
    """IBM ART's ``FastGradientMethod(eps)`` on a ``PyTorchClassifier(clip_values=(0, 1))`` fed tensors
    normalised with ``mean`` / ``std`` (the SD-Dropout authors' setting), expressed on [0, 1] images.

    The attack runs on ``(x - mean) / std`` against the model's own predictions (ART without labels) and
    is clipped to (0, 1) *in that normalised space*; the result is mapped back to pixels. So ``eps`` is
    ``eps * std`` in pixels per channel, and the clip box is ``[mean, mean + std]``.

    Args:
        f: the attacked function of [0, 1] images.
        x: (B, C, H, W) clean images in [0, 1].
        eps: the budget in normalised units.
        mean, std: (C, 1, 1) the normalisation the attack sees.
    """
    def g(xn: Tensor) -> Tensor:
        return f(xn * std + mean)

    xn = (_full(x) - mean) / std
    with torch.no_grad():
        pred = g(xn).argmax(1)
    return fgsm(g, xn, pred, eps, clip=(0.0, 1.0)) * std + mean


def pgd(f: Attacked, x: Tensor, y: Tensor, eps: float, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, clip: tuple[float, float] = (0.0, 1.0),
        gen: torch.Generator | None = None) -> Tensor:
    """Projected gradient ascent on the cross-entropy inside the L-infinity ball of radius ``eps``.

    Each step moves ``step_size`` along the gradient's sign and projects back onto the intersection of
    the ``eps``-ball around ``x`` and ``clip``. Madry et al. start from a uniform random point of the
    ball; ``random_start=False`` starts at ``x``, so the first step is FGSM with ``step_size``.

    Args:
        steps: gradient steps.
        step_size: per-step move; ``None``: ``2.5 * eps / steps`` (Madry et al.: enough to cross the
            ball and come back from any start).
        gen: generator of the random start (CPU), for reproducible results.
    """
    x = _full(x)
    alpha = 2.5 * eps / steps if step_size is None else step_size
    lo, hi = (x - eps).clamp(*clip), (x + eps).clamp(*clip)
    adv = x
    if random_start:
        noise = torch.rand(x.shape, generator=gen, device="cpu" if gen is not None else x.device)
        adv = x + (noise.to(x) * 2 - 1) * eps
    adv = torch.max(torch.min(adv, hi), lo)
    for _ in range(steps):
        adv = adv + alpha * input_gradient(f, adv, y).sign()
        adv = torch.max(torch.min(adv, hi), lo)  # the projection onto ball ∩ box
    return adv.detach()
