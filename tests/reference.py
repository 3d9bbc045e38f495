"""Helpers shared by the method tests: one engine step without the optimizer, gradient probes, and the
hand-written numpy reference maths each method's losses are checked against."""
from __future__ import annotations

import numpy as np
import torch

from peerdistill.engine.trainer import StepRecord, Trainer


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
