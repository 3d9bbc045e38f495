"""CL-ILR: collaborative learning with intermediate-level representation sharing (Song & Chai, NeurIPS 2018)."""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import PeerdistillError
from ..params import NonNegative, Positive
from .base import METHODS, DataInfo, Method, Needs, StepRecord
from .functional import kd_kl, mean_logits, sigmoid_rampup


@METHODS.register("cl_ilr")
class CLILR(Method):
    """m heads on one shared trunk; each head learns from the labels and from the mean logits of the
    other heads, and the trunk's gradient is rescaled by 1/m (backprop rescaling).

    Per head i (baselines §2), with ``z_{-i} = mean_{j != i} z_j`` (the *logits* averaged, then
    softened):

        ce{i} = ce_weight * CE(z_i),   kl{i} = w(e) * weight * KD_T(z_i, sg(z_{-i}))

    Defaults are the paper / MCL-OKD setting: beta = 0.5 between the hard and the soft loss
    (``ce_weight = beta``, ``weight = 1 - beta``), T = 2, targets detached, no ramp-up. ILR sharing: the
    gradient flowing back into the shared trunk is divided by the number of heads (``rescale``), so the
    trunk receives the heads' mean gradient instead of their sum. The OKDDip authors' re-implementation
    (``train_one.py --avg --bpscale``) is ``ce_weight=1 weight=1 temperature=3 rampup_epochs=80
    detach_targets=false``.

    Topology: the contract's branched cohort has one split point (the stem and every stage up to
    ``split_after`` shared, default all stages but the last, as in the OKDDip code); MCL-OKD's binary
    tree (stage 2 shared by pairs of heads, 1/2 rescaling at each branching) is not expressible.
    Evaluated heads: every head and their probability ensemble.

    Args:
        ce_weight: weight of each head's CE (the paper's beta).
        weight: weight of each head's KD term (the paper's 1 - beta).
        temperature: T of the KD terms.
        rampup_epochs: length of the sigmoid ramp-up of the KD weight in epochs; 0 disables it.
        detach_targets: stop the gradient through the other heads' mean logits.
        rescale: divide the gradient into the shared trunk by the number of heads.
        split_after: last shared stage; empty = all stages but the last.
    """

    def __init__(self, ce_weight: NonNegative = 0.5, weight: NonNegative = 0.5, temperature: Positive = 2.0,
                 rampup_epochs: NonNegative = 0.0, detach_targets: bool = True, rescale: bool = True,
                 split_after: str = "") -> None:
        super().__init__()
        self.ce_weight, self.weight, self.temperature = ce_weight, weight, temperature
        self.rampup_epochs, self.detach_targets, self.rescale = rampup_epochs, detach_targets, rescale
        # The heads' targets combine their outputs on one input: one shared (mixed) view.
        # Backprop rescaling (Song & Chai; the OKDDip code's `ILR` op): the trunk gets the mean, not the
        # sum, of the heads' gradients.
        self.needs = Needs(default_peers=3, min_peers=2, topology="branched", split_after=split_after or None,
                           trunk_grad="mean" if rescale else "sum")

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        if cohort.shared < 1:
            raise PeerdistillError("method 'cl_ilr' needs a branched cohort with at least one shared stage")

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        z = [o.logits for o in rec.outputs]
        w = self.weight * sigmoid_rampup(rec.epoch, self.rampup_epochs)
        terms: dict[str, Tensor] = {}
        for i, z_i in enumerate(z):
            others = mean_logits([z_j for j, z_j in enumerate(z) if j != i])  # (B, K)
            terms[f"ce{i}"] = self.ce_weight * rec.ce(z_i, i)
            terms[f"kl{i}"] = w * kd_kl(z_i, others, self.temperature, detach_target=self.detach_targets)
        return terms
