"""Helpers shared by the method tests: one engine step without the optimizer, gradient probes, the
hand-written numpy reference maths each method's losses are checked against, and the float32 tolerance
those checks use.

Tolerances. A library value computed in float32 is compared with a float64 reference; CPU kernels
(ATen's AVX2 / AVX-512 paths, oneDNN, MKL) choose their summation order by CPU, so the float32 value
differs between machines by its rounding error. That error is bounded by a few dozen float32 ulps of the
*magnitude of what is summed or cancelled*, never of the result: a KL between a network and its
near-identical EMA copy is the 0.003 difference of a cross-entropy and an entropy of about 1.6 each.
:func:`f32` and :func:`close32` take that magnitude; the ``*_mag`` helpers compute it for the formulas
here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from peerdistill.engine.trainer import StepRecord, Trainer
from peerdistill.methods import PeerOutput


def first_batch(tr: Trainer):
    return next(iter(tr.train_loader))


def record(tr: Trainer, epoch: int = 0) -> StepRecord:
    """One forward through the engine's pieces (views, cohort, method inputs), without the optimizer step."""
    tr.epoch = epoch
    return tr.step_record(first_batch(tr))


def checkpoint_after_one_epoch(tr: Trainer, path) -> Trainer:
    """Train ``tr`` one epoch (its before-training hook first) and save its checkpoint to ``path``."""
    from peerdistill.engine.checkpoint import save_atomic

    tr.before_training()
    tr.train_epoch()
    tr.epoch += 1
    save_atomic(tr.state(), path)
    return tr


def as_float64(rec: StepRecord) -> StepRecord:
    """The record with every output in float64 (views and labels untouched): with the method moved to
    float64 too (``method.double()``), its losses are computed in float64 and can be checked against a
    float64 reference to its precision, on any CPU. The outputs are new leaves (a gradient stops at them)."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().requires_grad_(t.requires_grad)

    def out(o: PeerOutput | None) -> PeerOutput | None:
        if o is None:
            return None
        return PeerOutput(leaf(o.logits), leaf(o.embedding), {k: leaf(v) for k, v in o.maps.items()})

    def outs(os: list[PeerOutput | None] | None) -> list[PeerOutput | None] | None:
        return None if os is None else [out(o) for o in os]

    return dataclasses.replace(rec, outputs=outs(rec.outputs), ema=outs(rec.ema), teacher=outs(rec.teacher),
                               extra={k: outs(v) for k, v in rec.extra.items()},
                               teacher_extra={k: outs(v) for k, v in rec.teacher_extra.items()})


def has_grad(params) -> bool:
    return any(p.grad is not None and p.grad.any() for p in params)


def no_grad(params) -> bool:
    return not has_grad(params)


def branch(tr: Trainer, i: int) -> list[torch.nn.Parameter]:
    """Peer i's own (unshared) parameters: the stages after the shared trunk and its classifier."""
    net = tr.cohort.nets[i]
    return [p for s in net.stages[tr.cohort.shared:] for p in s.parameters()] + list(net.classifier.parameters())


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_kd(student: np.ndarray, teacher: np.ndarray, t: float, w: np.ndarray | None = None) -> float:
    """T^2 * sum_k p_t (log p_t - log p_s), batch mean (weighted per sample by ``w`` if given)."""
    lt, ls = np_log_softmax(teacher / t), np_log_softmax(student / t)
    per = (np.exp(lt) * (lt - ls)).sum(1)
    return float(t * t * (per if w is None else per * w).mean())


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


# ------------------------------------------------------------------ float32 tolerances
EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
ULPS = 64  # float32 roundings per unit of magnitude: worst-case growth of a class sum and a batch mean
#           (tens of terms each) plus the 1-4 ulp error of a vectorised exp or log


def f32(expected: float, magnitude: float, ulps: float = ULPS) -> Any:
    """``pytest.approx(expected)`` within ``ulps`` float32 ulps of ``magnitude``, the size of the terms
    the library summed or cancelled to get the value (not the value itself)."""
    return pytest.approx(expected, rel=0, abs=ulps * EPS32 * float(magnitude))


def close32(got: torch.Tensor, want: Any, magnitude: Any, ulps: float = ULPS) -> bool:
    """Element-wise :func:`f32` for tensors; ``magnitude`` is a number or a broadcastable tensor."""
    want, mag = torch.as_tensor(want, dtype=torch.float64), torch.as_tensor(magnitude, dtype=torch.float64)
    return bool(((got.detach().double() - want).abs() <= ulps * EPS32 * mag).all())


def np_kl_mag(student: np.ndarray, q: np.ndarray, t: float, w: np.ndarray | None = None) -> float:
    """The magnitude behind ``T^2 KL(q || softmax(s / T))``, batch mean, per row
    ``T^2 (H(q) + CE(q, p_s) + 1 + 2 max|s / T|)``.

    The KL is the difference of that cross-entropy and entropy (log-probabilities are <= 0, so
    ``sum q (|log q| + |log p_s|)`` is their sum); a float32 log-softmax also rounds ``s / T`` and its
    shift by the row maximum (``2 max|s / T|``) and its log-sum-exp in absolute terms (the 1)."""
    ls = np_log_softmax(student / t)
    lq = np.log(np.where(q > 0, q, 1.0))
    per = (q * (np.abs(lq) + np.abs(ls))).sum(1) + 1.0 + 2 * np.abs(student / t).max(1)
    return float(t * t * (per if w is None else per * np.abs(w)).mean())


def np_kd_mag(student: np.ndarray, teacher: np.ndarray, t: float, w: np.ndarray | None = None,
              teacher_mag: np.ndarray | None = None) -> float:
    """:func:`np_kl_mag` for a teacher given as logits (the magnitude behind :func:`np_kd`): its
    log-softmax rounds like the student's, ``2 max|t / T|`` per row. ``teacher_mag`` (B, K): the size of
    the terms the library combined into the teacher logits (an ensemble of students), if larger."""
    tm = np.abs(teacher) if teacher_mag is None else np.maximum(np.abs(teacher), teacher_mag)
    teacher_part = 2 * (tm / t).max(1) * (1 if w is None else np.abs(w))
    return np_kl_mag(student, np.exp(np_log_softmax(teacher / t)), t, w) + float(t * t * teacher_part.mean())


def np_ce_mag(z: np.ndarray, y: np.ndarray) -> float:
    """The magnitude behind a cross-entropy, batch mean: per row ``-log p_y + 1 + 2 max|z|`` (its
    log-softmax, as in :func:`np_kl_mag`)."""
    return np_ce(z, y) + 1.0 + 2 * float(np.abs(z).max(1).mean())
