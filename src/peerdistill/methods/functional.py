"""Pure loss maths shared by every method: one KL, one reduction convention.

Convention (all reference codes, spec §0): a KD term is
``T^2 * KL(softmax(t / T) || softmax(s / T))`` summed over classes and averaged over the batch.
Losses are computed in float32 even under autocast (float64 inputs stay float64, so the formulas can be
checked against a float64 reference to its precision).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def f32(x: Tensor) -> Tensor:
    """float32 for half / bfloat16 / float32 inputs; float64 stays float64 (exact checks of the formulas)."""
    return x if x.dtype == torch.float64 else x.float()


def kd_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0, detach_target: bool = True,
          weights: Tensor | None = None) -> Tensor:
    """``T^2 * KL(p_t || p_s)`` with ``p = softmax(logits / T)``; batch mean (or ``weights``-weighted).

    Args:
        student: (B, K) logits that receive the gradient.
        teacher: (B, K) target logits; detached unless ``detach_target`` is False (SD-Dropout).
        temperature: softening temperature T.
        detach_target: stop the gradient through the target.
        weights: optional (B,) per-sample weights; the sum is still divided by B (L-MCL convention).
    """
    t = teacher.detach() if detach_target else teacher
    log_ps = F.log_softmax(f32(student) / temperature, dim=1)
    log_pt = F.log_softmax(f32(t) / temperature, dim=1)
    per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean() * temperature ** 2


def soft_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy with a probability target: ``-sum_k q_k log softmax(z)_k``, batch mean."""
    return -(f32(target_probs) * F.log_softmax(f32(logits), dim=1)).sum(1).mean()


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Hard-label cross-entropy in float32."""
    return F.cross_entropy(f32(logits), labels, label_smoothing=label_smoothing)


def sigmoid_rampup(epoch: float, length: float, scale: float = 1.0) -> float:
    """Mean-teacher ramp-up ``scale * exp(-5 (1 - clip(e, 0, L)/L)^2)`` (Laine & Aila 2017)."""
    if length <= 0:
        return scale
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return scale * math.exp(-5.0 * phase * phase)


def mean_logits(logits: Sequence[Tensor]) -> Tensor:
    """Arithmetic mean of logits (the ensemble teacher of CL-ILR, DKEL, MCL)."""
    return torch.stack([f32(z) for z in logits]).mean(0)


def ensemble_log_probs(logits: Sequence[Tensor]) -> Tensor:
    """log of the mean of the members' softmax probabilities (the evaluated "ensemble" head)."""
    probs = torch.stack([F.softmax(f32(z), dim=1) for z in logits]).mean(0)
    return probs.clamp_min(1e-12).log()


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(B,) entropy of softmax(logits / T) in nats."""
    logp = F.log_softmax(f32(logits) / temperature, dim=1)
    return -(logp.exp() * logp).sum(1)


def linear_ensemble_weights(logits: Sequence[Tensor], targets: Tensor, steps: int = 20) -> Tensor:
    """(m,) weights on the simplex minimising ``CE(sum_i w_i z_i, q)`` on the batch (KDCL-Linear).

    No gradient reaches the members. The objective is convex in ``w``; it is minimised by exponentiated
    gradient (mirror descent on the simplex, from the uniform weights) with the closed-form gradient
    ``g_i = mean_b <p_b - q_b, z_ib>`` and the step ``1 / max_i H_ii``, where ``H_ii = mean_b Var_{p_b}(z_ib)``
    is the Hessian's diagonal: an upper bound of its l1-smoothness, so every step descends. A fixed
    number of tensor-only steps: no host synchronisation.

    Args:
        logits: m tensors (B, K).
        targets: (B, K) target probabilities (one-hot, or mixed labels under a mixer).
        steps: mirror-descent iterations.
    """
    z = torch.stack([t.detach().float() for t in logits])  # (m, B, K)
    q = targets.detach().float()
    log_w = torch.full((z.shape[0],), -math.log(z.shape[0]), device=z.device)
    for _ in range(steps):
        p = torch.einsum("m,mbk->bk", log_w.exp(), z).softmax(1)  # (B, K)
        grad = torch.einsum("bk,mbk->m", p - q, z) / z.shape[1]  # (m,)
        mean_z = torch.einsum("bk,mbk->mb", p, z)  # (m, B)
        curv = (torch.einsum("bk,mbk->mb", p, z * z) - mean_z * mean_z).mean(1)  # (m,) = H_ii
        log_w = (log_w - grad / curv.max().clamp_min(1e-6)).log_softmax(0)
    return log_w.exp()


def min_logit_ensemble(logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """(B, K) KDCL-MinLogit: ``min_i (z_i - <q, z_i> 1)`` element-wise, no gradient.

    With one-hot ``q`` each member's true-class logit is subtracted (the true class gets 0, every other
    class its most negative margin over the members); a mixed ``q`` subtracts the label-weighted logit.
    """
    q = targets.detach().float()
    shifted = [z.detach().float() - (z.detach().float() * q).sum(1, keepdim=True) for z in logits]
    return torch.stack(shifted).amin(0)


def kd_soft(student: Tensor, target_probs: Tensor, temperature: float = 1.0, weights: Tensor | None = None) -> Tensor:
    """``T^2 * KL(q || softmax(s / T))`` with a probability target ``q`` (already softened at T, detached).

    The form of :func:`kd_kl` for targets that are not one network's logits: mixed predictions
    (``rec.peer_target``), ensembles of probabilities, stored temporal ensembles.

    Args:
        student: (B, K) logits that receive the gradient.
        target_probs: (B, K) target probabilities (rows sum to 1); never receives a gradient.
        temperature: softening temperature T of the student (the target is already softened).
        weights: optional (B,) per-sample weights; the sum is still divided by B (as :func:`kd_kl`).
    """
    q = f32(target_probs.detach())
    log_ps = F.log_softmax(f32(student) / temperature, dim=1)
    per_sample = (torch.xlogy(q, q) - q * log_ps).sum(1)  # (B,); xlogy: 0 log 0 = 0
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean() * temperature ** 2


def normalized_mse(student: Tensor, target: Tensor) -> Tensor:
    """Squared L2 distance between per-sample L2-normalised feature maps (B, ...), in [0, 4]; batch mean.
    The target is detached."""
    s = F.normalize(f32(student).flatten(1), dim=1)
    t = F.normalize(f32(target.detach()).flatten(1), dim=1)
    return (s - t).pow(2).sum(1).mean()


def attention_transfer(student: Tensor, target: Tensor, p: float = 2.0, beta: float = 1000.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between (B, C, H, W) maps; target detached.

    ``a(F) = normalize(mean_c |F_c|^p)`` over the H*W positions; the loss is
    ``beta / 2 * mean_{b, hw} (a_s - a_t)^2``, the official code's ``at_loss`` with its CIFAR weight
    ``beta = 1e3`` (szagoruyko/attention-transfer ``utils.py``). Channel-agnostic, so maps of different
    widths (same H, W) compare.
    """
    def att(f: Tensor) -> Tensor:
        return F.normalize(f32(f).abs().pow(p).mean(1).flatten(1), dim=1)  # (B, H*W)

    return beta / 2 * (att(student) - att(target.detach())).pow(2).mean()


def channel_kl(student: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL`` between the channel softmaxes of two (B, C, H, W) maps at every position, summed over
    channels, averaged over positions and batch; target detached."""
    log_ps = F.log_softmax(f32(student) / temperature, dim=1)
    log_pt = F.log_softmax(f32(target.detach()) / temperature, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * temperature ** 2
