"""PS-KD: progressive self-knowledge distillation (Kim, Ji, Yoon & Hwang, ICCV 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import Probability
from .base import METHODS, DataInfo, Method, Needs, StepRecord, all_ranks
from .functional import f32, soft_ce


@METHODS.register("ps_kd")
class PSKD(Method):
    """Each network trains on a soft target that mixes the label with its own prediction of the
    sample from the previous epoch, trusted more as training goes on.

    Official code (``lgcnsai/PS-KD-Pytorch`` ``main.py``, baselines §11): at epoch e (0-based)
    of E, ``y_soft = (1 - a_e) onehot(y) + a_e P[idx]`` with ``a_e = alpha_T (e + 1) / E``, and the
    soft-target cross-entropy ``-sum_k y_soft,k log softmax(z)_k`` *replaces* CE (term ``ce{i}``). P is a
    per-sample store (N x K per network, a checkpointed buffer) of the softmax of the training-mode
    output on the sample's augmented view, written after each step by dataset index; it starts as the
    one-hot labels, so epoch 0 trains on hard labels, as the official code's epoch-0 initialisation.

    Previous-epoch semantics without an epoch-end hook: a random-order epoch visits each sample at most
    once and the loss reads P[idx] before the step writes it, so the value read is the sample's
    prediction from the last epoch it was visited in (the previous one, except for the few samples the
    dropped last batch skipped) -- exactly the official single ``all_predictions`` array. Under a mixer
    the targets of the mixed samples are mixed with the label weights, and a mixed batch writes nothing
    (a prediction on a mixed image is not one of the sample). Under torchrun the predictions and indices
    are gathered from every rank before the write.

    Args:
        alpha_t: alpha_T, the final weight of the stored predictions (0.8 in the paper and code).
    """

    def __init__(self, alpha_t: Probability = 0.8) -> None:
        super().__init__()
        self.alpha_t = alpha_t
        self.needs = Needs(default_peers=1)
        self.register_buffer("store", torch.zeros(0))  # (peers, N, K), sized in setup

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        onehot = F.one_hot(data.train_labels.long(), data.num_classes).float()  # (N, K)
        self.store = onehot.expand(len(cohort), -1, -1).clone()

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        a = self.alpha_t * (rec.epoch + 1) / rec.total_epochs
        terms: dict[str, Tensor] = {}
        for i, (o, v) in enumerate(zip(rec.outputs, rec.views)):
            onehot = F.one_hot(v.labels, rec.num_classes).to(self.store.dtype)
            target = (1.0 - a) * onehot + a * self.store[i, v.index]  # (B, K)
            terms[f"ce{i}"] = soft_ce(o.logits, target if v.mix is None else v.mix.mix(target))
        return terms

    @torch.no_grad()
    def update(self, rec: StepRecord) -> None:
        for i, (o, v) in enumerate(zip(rec.outputs, rec.views)):
            if v.mix is None:
                # every rank stores every sample
                index, probs = all_ranks(v.index, F.softmax(f32(o.logits.detach()), dim=1))
                self.store[i, index] = probs
