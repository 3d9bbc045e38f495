"""Pure loss maths shared by every method: one KL, one reduction convention.

Convention (all reference codes, methods.md §0): a KD term is
``T^2 * KL(softmax(t / T) || softmax(s / T))`` summed over classes and averaged over the batch.
Losses are computed in float32 even under autocast.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    log_ps = F.log_softmax(student.float() / temperature, dim=1)
    log_pt = F.log_softmax(t.float() / temperature, dim=1)
    per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean() * temperature ** 2


def soft_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy with a probability target: ``-sum_k q_k log softmax(z)_k``, batch mean."""
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Hard-label cross-entropy in float32."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def sigmoid_rampup(epoch: float, length: float, scale: float = 1.0) -> float:
    """Mean-teacher ramp-up ``scale * exp(-5 (1 - clip(e, 0, L)/L)^2)`` (Laine & Aila 2017)."""
    if length <= 0:
        return scale
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return scale * math.exp(-5.0 * phase * phase)


def mean_logits(logits: Sequence[Tensor]) -> Tensor:
    """Arithmetic mean of logits (the ensemble teacher of CL-ILR, DKEL, MCL)."""
    return torch.stack([z.float() for z in logits]).mean(0)


def ensemble_log_probs(logits: Sequence[Tensor]) -> Tensor:
    """log of the mean of the members' softmax probabilities (the evaluated "ensemble" head)."""
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits]).mean(0)
    return probs.clamp_min(1e-12).log()


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(B,) entropy of softmax(logits / T) in nats."""
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    return -(logp.exp() * logp).sum(1)
