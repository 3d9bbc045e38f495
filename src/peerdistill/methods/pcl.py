"""PCL: peer collaborative learning for online knowledge distillation (Wu & Gong, AAAI 2021)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..data.views import View
from ..errors import PeerdistillError
from ..params import Decay, NonNegative, Positive
from .base import METHODS, DataInfo, Method, Needs, PeerOutput, StepRecord
from .functional import cross_entropy, kd_kl, sigmoid_rampup, soft_ce

Rampup = Literal["correct", "code"]
Schedule = Literal["fixed", "meanteacher"]
Mix = Literal["shared", "per_view"]
ClassifierInit = Literal["independent", "copy"]


def code_rampup(epoch: int, length: float, scale: float) -> float:
    """The ramp-up exactly as the shaoeric PCL/DKEL code computes it (``compute_rampup_weight``):
    ``scale if e > length else scale * exp(-5 (1 - e / scale)^2)``. It divides by ``scale`` (``lambd``)
    where ``length`` (``alpha``) was meant, so with scale 1 it is e^-5, 1, e^-5, then ~0 up to epoch 80
    (the value at e = length is ~0 too), and ``scale`` from epoch 81 on (spec §1.2)."""
    if epoch > length:
        return scale
    if scale == 0:  # the code would divide by zero; the weight is 0 either way
        return 0.0
    return scale * math.exp(-5.0 * (1.0 - epoch / scale) ** 2)


def view_ce(logits: Tensor, view: View, num_classes: int) -> Tensor:
    """Cross-entropy of ``logits`` against ``view``'s labels, mixed as its pixels were (outside a step)."""
    if view.mix is None:
        return cross_entropy(logits, view.labels)
    return soft_ce(logits, view.soft_targets(num_classes))


@METHODS.register("pcl")
class PCL(Method):
    """m peer branches on a shared trunk, each on its own augmented view, taught by a peer ensemble
    teacher (a classifier on the concatenated branch embeddings) and by the temporal-mean (EMA) copies
    of the other peers.

    Per iteration (spec §1.2; T = 3; z_i: branch i on view i; z_e = FC([f_1, ..., f_m]); z̄_j: the
    EMA copy's branch j on view j, run in train mode with its own BN statistics)::

        L = CE(z_e) + sum_i [ CE(z_i) + w(e) KD_T(z_i, sg z_e) + w(e)/(m-1) sum_{j != i} KD_T(z_i, z̄_j) ]

    with the 80-epoch sigmoid ramp-up ``w(e) = weight * exp(-5 (1 - e/80)^2)`` of the 0-based epoch.
    ``rampup="code"`` reproduces the released code's ``epoch / lambd`` bug (:func:`code_rampup`). The EMA
    follows the code's mean-teacher schedule ``a_t = min(1 - 1/(t+1), 0.999)``, t = 0 at the first
    update after the first optimizer step (so that update copies the student). Loss terms: ``ce_ens``,
    ``ce{i}``, ``kd_ens{i}``, ``kd_mean{i}``. Evaluated heads: ``peer{i}``, ``ensemble`` (mean of the
    peers' probabilities), ``ema{i}`` (temporal-mean peers: the paper's "PCL" is ``ema0``) and
    ``ens_teacher`` (z_e); at evaluation every branch sees the same unaugmented image.

    Args:
        temperature: T of every KD term.
        weight: lambda, the ramp-up's final value.
        rampup_epochs: length of the sigmoid ramp-up (80 in the code); 0 = ``weight`` from epoch 0.
        rampup: ``correct`` (the mean-teacher sigmoid) or ``code`` (the released code's bug).
        ema_decay: the temporal mean's decay.
        ema_schedule: ``meanteacher`` (the code) or ``fixed`` (decay from step 0; the EMA then starts
            from the student's initial weights, a copy made at build time).
        mix: with a mixer, ``shared`` (one draw mixes every branch's view alike); ``per_view`` is refused.
        classifier_init: ``independent`` (each branch's classifier initialised on its own, as every
            branched cohort here) or ``copy`` (all start as branch 0's: the re-implementation deep-copies
            branch 1 and re-initialises only the convolutions).
    """

    key = "pcl"

    def __init__(self, temperature: Positive = 3.0,
                 weight: NonNegative = 1.0, rampup_epochs: NonNegative = 80.0, rampup: Rampup = "correct",
                 ema_decay: Decay = 0.999, ema_schedule: Schedule = "meanteacher", mix: Mix = "shared",
                 classifier_init: ClassifierInit = "independent") -> None:
        super().__init__()
        if mix == "per_view":
            raise PeerdistillError(f"method {self.key!r} needs mix=shared: the ensemble classifier reads every "
                                   f"branch at once, so the branches' views must be mixed by one draw")
        self.temperature, self.weight, self.rampup_epochs, self.rampup = temperature, weight, rampup_epochs, rampup
        self.ema_schedule, self.classifier_init = ema_schedule, classifier_init
        # m = 3 branches unless the config sets ``peers`` (the paper's and the code's cohort).
        self.needs = Needs(default_peers=3, min_peers=2, topology="branched", views="per_peer", mix="shared",
                           ema_decay=ema_decay, ema_warmup="meanteacher" if ema_schedule == "meanteacher" else "none",
                           ema_train_mode=True)
        self.num_classes = 0
        self.ensemble_fc: nn.Linear | None = None

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        # The peer ensemble teacher (the code's ``en_fc``): one linear layer on the m concatenated GAP
        # embeddings, PyTorch's default init as in the code (its init loop only touches convs and BN).
        self.num_classes = data.num_classes
        self.ensemble_fc = nn.Linear(sum(net.num_features for net in cohort.nets), data.num_classes)
        if self.classifier_init == "copy":  # before the engine copies the cohort into its EMA
            for net in cohort.nets[1:]:
                net.classifier.load_state_dict(cohort.nets[0].classifier.state_dict())

    def ensemble_logits(self, outputs: list[PeerOutput]) -> Tensor:
        """(B, K) z_e from the branches' embeddings, each computed on its branch's own view."""
        return self.ensemble_fc(torch.cat([o.embedding for o in outputs], dim=1))  # (B, m*D) -> (B, K)

    def rampup_weight(self, epoch: int) -> float:
        """w(e) of the 0-based epoch: the correct sigmoid ramp-up or the code's (``rampup``)."""
        if self.rampup == "code":
            return code_rampup(epoch, self.rampup_epochs, self.weight)
        return sigmoid_rampup(epoch, self.rampup_epochs, self.weight)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        if rec.ema is None:
            raise PeerdistillError(f"method {self.key!r} needs the engine's EMA copy")
        z_e = self.ensemble_logits(rec.outputs)
        w = self.rampup_weight(rec.epoch)
        terms: dict[str, Tensor] = {"ce_ens": rec.ce(z_e)}
        for i, o in enumerate(rec.outputs):
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            terms[f"kd_ens{i}"] = w * kd_kl(o.logits, z_e, self.temperature)  # target detached: sg(z_e)
            others = [rec.ema[j].logits for j in range(len(rec.outputs)) if j != i]
            terms.update(self.mean_terms(i, o.logits, others, w, rec.epoch))
        return terms

    def mean_terms(self, i: int, z_i: Tensor, others: list[Tensor], w: float, epoch: int) -> dict[str, Tensor]:
        """Peer i's peer-mean-teacher loss from the other peers' temporal means (no gradient)."""
        kd = sum(kd_kl(z_i, t, self.temperature) for t in others) / len(others)
        return {f"kd_mean{i}": w * kd}

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        heads["ens_teacher"] = self.ensemble_logits(outputs)
        return heads
