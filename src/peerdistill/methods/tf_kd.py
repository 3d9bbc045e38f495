"""Tf-KD_reg: teacher-free KD with a hand-designed virtual teacher (Yuan et al., CVPR 2020)."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from ..params import Interval, NonNegative, Positive, Probability
from .base import METHODS, Method, Needs, StepRecord
from .functional import f32, kd_soft


@METHODS.register("tf_kd")
class TFKD(Method):
    """Tf-KD_reg: each network is pulled towards a virtual teacher that puts ``correct_prob`` on the true
    class and spreads the rest uniformly, a label-smoothing-like regulariser.

    Exactly the official ``loss_kd_regularization`` (baselines §10.1): with u_k = a for the true
    class and (1 - a)/(K - 1) otherwise (a = 0.99, hard-coded there), the teacher is q = softmax(u / tau)
    -- the softmax is applied to the probabilities themselves, so q is nearly uniform (CIFAR-100,
    tau = 20: q_y ~ 0.0105 against ~0.0100) and the term acts as a pull towards uniform -- the student is
    not temperature-scaled, and the KL is ``nn.KLDivLoss()``'s mean over all B x K entries (no T^2):

        L = (1 - alpha) CE(z, y) + alpha * multiplier * (1/(B K)) sum_{b,k} q_bk log(q_bk / softmax(z_b)_k)

    Defaults are the official ResNet-18 CIFAR-100 ``params.json``: tau = 20, alpha = 0.1, multiplier = 100
    (MobileNetV2 40/0.95/1, ShuffleNetV2 10/0.95/1, GoogLeNet 40/0.1/50). Under a mixer the teachers of
    the mixed samples are mixed with the label weights. Terms: ``ce{i}`` and ``reg{i}``. Tf-KD_self (a
    trained copy as the teacher) is method ``kd`` with a teacher run (see the docs).

    Args:
        temperature: tau, applied to the virtual teacher's probabilities only.
        alpha: weight of the regulariser against (1 - alpha) on CE.
        multiplier: the official ``multiplier`` on the regulariser.
        correct_prob: a, the virtual teacher's probability of the true class.
    """

    def __init__(self, temperature: Positive = 20.0, alpha: Probability = 0.1, multiplier: NonNegative = 100.0,
                 correct_prob: Annotated[float, Interval(gt=0, lt=1)] = 0.99) -> None:
        super().__init__()
        self.temperature, self.alpha, self.multiplier, self.correct_prob = temperature, alpha, multiplier, correct_prob
        self.needs = Needs(default_peers=1)

    def teacher(self, labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, K) q = softmax(u / tau) of the virtual teacher's distribution u."""
        a, k = self.correct_prob, num_classes
        u = torch.full((labels.shape[0], k), (1.0 - a) / (k - 1), device=labels.device, dtype=dtype)
        u.scatter_(1, labels[:, None], a)
        return F.softmax(u / self.temperature, dim=1)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        k = rec.num_classes
        for i, (o, v) in enumerate(zip(rec.outputs, rec.views)):
            q = self.teacher(v.labels, k, f32(o.logits).dtype)
            q = q if v.mix is None else v.mix.mix(q)
            terms[f"ce{i}"] = (1.0 - self.alpha) * rec.ce(o.logits, i)
            terms[f"reg{i}"] = self.alpha * self.multiplier * kd_soft(o.logits, q) / k  # batch mean / K = mean
        return terms
