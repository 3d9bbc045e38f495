"""DKEL: decoupled knowledge with ensemble learning for online distillation (Shao & Chen, arXiv 2312.11218)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..params import Decay, NonNegative, NonNegativeInt, Positive
from .base import METHODS, PreTrainContext, world_size
from .functional import kd_kl, mean_logits
from .meta import all_reduce_mean
from .pcl import PCL, ClassifierInit, Mix, Rampup, Schedule, view_ce

# The released code (src/losses/loss_wrapper.py) drops the ensemble term once exp(-k e) <= 0.01.
ENSEMBLE_CUTOFF = 0.01
# Teacher initialisation (src/trainer.py ``init_mean_model``): plain SGD at lr = base_lr / 100.
INIT_LR_SCALE = 0.01


@METHODS.register("dkel")
class DKEL(PCL):
    """PCL with an independent teacher: the temporal-mean copy starts as a copy of the student, is
    trained alone for a few steps before the first epoch, is averaged with a fixed decay so that this
    head start persists, and its peers teach through a decaying ensemble.

    Differences from :class:`~peerdistill.methods.pcl.PCL` (spec §2.1), everything else equal:

    * teacher initialisation (``before_training``, once per run, checkpointed): the EMA copy, trainable
      and in train mode, takes ``init + 1`` plain SGD steps (lr = base_lr/100, no momentum, the config's
      weight decay) on ``mean_b CE(teacher branch b on view b)``;
    * decaying ensemble in the peer-mean loss, with ``w_ens(e) = exp(-k e)`` (0 once <= 0.01)::

          L_pm,i = r(e) [ w_ens KD_T(z_i, mean_{j != i} z̄_j) + (1 - w_ens) / (m-1) sum_{j != i} KD_T(z_i, z̄_j) ]

      (``kd_mean_ens{i}`` and ``kd_mean{i}``); ``r(e)`` is the ramp-up with ``weight`` = 0.1, which also
      scales ``kd_ens{i}``;
    * ``ema_schedule="fixed"`` by default: a = 0.999 from the first update. The code's mean-teacher
      schedule (``meanteacher``) has a_0 = 0 and overwrites the initialised teacher's parameters with
      the student's after one step (only its BN statistics keep a trace; spec §2.2).

    Args:
        temperature: T of every KD term.
        weight: lambda of the ramp-up r(e) (0.1 in the code).
        rampup_epochs: length of the sigmoid ramp-up; 0 = ``weight`` from epoch 0.
        rampup: ``correct`` or ``code`` (the released ``epoch / lambd`` bug: r(e) ~ 0 for epochs 1..80).
        ensemble_decay: k of ``w_ens(e) = exp(-k e)`` (``--exp``, 0.5 in the code).
        init: the code's ``--init``: the initialisation takes ``init + 1`` SGD steps.
        teacher_init: run the teacher initialisation at all.
        ema_decay: the teacher's decay.
        ema_schedule: ``fixed`` (the initialisation persists) or ``meanteacher`` (the released code).
        mix: with a mixer, ``shared``; ``per_view`` is refused.
        classifier_init: ``independent`` or ``copy`` (the code's deep-copied branches), as PCL.
    """

    key = "dkel"

    def __init__(self, temperature: Positive = 3.0,
                 weight: NonNegative = 0.1, rampup_epochs: NonNegative = 80.0, rampup: Rampup = "correct",
                 ensemble_decay: NonNegative = 0.5, init: NonNegativeInt = 1, teacher_init: bool = True,
                 ema_decay: Decay = 0.999, ema_schedule: Schedule = "fixed", mix: Mix = "shared",
                 classifier_init: ClassifierInit = "independent") -> None:
        super().__init__(temperature, weight, rampup_epochs, rampup, ema_decay, ema_schedule, mix, classifier_init)
        self.ensemble_decay, self.init, self.teacher_init = ensemble_decay, init, teacher_init
        # SGD steps the teacher initialisation took (0: not run); checkpointed with the method.
        self.register_buffer("init_steps", torch.zeros((), dtype=torch.long))

    def ensemble_weight(self, epoch: int) -> float:
        """w_ens(e) = exp(-k e) of the 0-based epoch, 0 once it is <= 0.01 (as the code does)."""
        w = math.exp(-self.ensemble_decay * epoch)
        return w if w > ENSEMBLE_CUTOFF else 0.0

    def mean_terms(self, i: int, z_i: Tensor, others: list[Tensor], w: float, epoch: int) -> dict[str, Tensor]:
        w_ens = self.ensemble_weight(epoch)
        individual = sum(kd_kl(z_i, t, self.temperature) for t in others) / len(others)
        # The ensemble teacher: the arithmetic mean of the other peers' teacher logits.
        ens = kd_kl(z_i, mean_logits(others), self.temperature) if w_ens > 0 else z_i.new_zeros((), dtype=torch.float)
        return {f"kd_mean{i}": w * (1.0 - w_ens) * individual, f"kd_mean_ens{i}": w * w_ens * ens}

    def before_training(self, ctx: PreTrainContext) -> None:
        """The teacher initialisation: ``init + 1`` SGD steps of the EMA copy on its branches' CE."""
        if not self.teacher_init or ctx.ema is None:
            return
        teacher, was_training = ctx.ema, ctx.ema.training
        teacher.train().requires_grad_(True)
        opt = ctx.sgd_optimizer(teacher.parameters(), ctx.base_lr * INIT_LR_SCALE)
        scaler = ctx.scaler()  # fp16: scaled so small gradients survive, and a step with inf/NaN is skipped
        steps = 0
        for views in ctx.batches():
            with ctx.autocast():
                outs = teacher([v.x for v in views.peers], ctx.taps)
                loss = sum(view_ce(o.logits, v, self.num_classes) for o, v in zip(outs, views.peers)) / len(outs)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world_size() > 1:  # the teacher is no DDP module: average the ranks' gradients as DDP would,
                held = [p for p in teacher.parameters() if p.grad is not None]  # so it sees the global batch
                for p, g in zip(held, all_reduce_mean({str(k): p.grad for k, p in enumerate(held)}).values()):
                    p.grad.copy_(g)
            scaler.step(opt)
            scaler.update()
            steps += 1
            if steps > self.init:  # the code stops after batch index ``init``
                break
        opt.zero_grad(set_to_none=True)
        teacher.requires_grad_(False).train(was_training)
        self.init_steps.fill_(steps)
