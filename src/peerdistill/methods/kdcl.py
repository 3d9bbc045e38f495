"""KDCL: online knowledge distillation via collaborative learning (Guo et al., CVPR 2020)."""
from __future__ import annotations

from torch import Tensor

from ..params import Literal, NonNegative, Positive, PositiveInt
from .base import METHODS, Method, Needs, StepRecord, global_batch
from .functional import f32, kd_kl, linear_ensemble_weights, mean_logits, min_logit_ensemble


@METHODS.register("kdcl")
class KDCL(Method):
    """Independent students, each on its own augmentation of the batch, distil from one soft target
    ensembled from all the students' logits.

    No authors' code is public and the paper was not read (baselines §5: UNVERIFIED); this is
    a reconstruction from the abstract and third-party code. Each student i trains on its own view
    (``views="per_peer"``: an independent crop / flip / cutout of the same images, KDCL's "differently
    distorted" inputs), so the ensemble combines the students' outputs on their own views. The target
    ``z_t`` (no gradient into any student) is, by ``ensemble``:

    * ``naive``: the mean of the logits (as the third-party LDG code);
    * ``linear``: ``sum_i w_i z_i`` with ``w >= 0, sum w = 1`` minimising the CE of the combination on the
      batch, by a fixed number of exponentiated-gradient steps (:func:`functional.linear_ensemble_weights`);
    * ``minlogit``: ``min_i (z_i - z_{i,y} 1)`` element-wise (the label-weighted logit under a mixer).

    Terms: ``ce{i} = CE(z_i)``, ``kl{i} = weight * KD_T(z_i, sg(z_t))`` with T = 2 (LDG) and weight 1.
    Heterogeneous students are allowed (``model=resnet8,resnet14``). Under a mixer one draw mixes every
    view alike, so all students see the same pairs, box and lambda. Evaluated heads: every student and
    their probability ensemble.

    Args:
        ensemble: how the soft target is built: ``naive``, ``linear`` or ``minlogit``.
        temperature: T of the KD terms.
        weight: weight lambda of the KD terms.
        linear_steps: iterations of the ``linear`` ensemble's weight solver.
    """

    def __init__(self, ensemble: Literal["naive", "linear", "minlogit"] = "naive", temperature: Positive = 2.0,
                 weight: NonNegative = 1.0, linear_steps: PositiveInt = 20) -> None:
        super().__init__()
        self.ensemble, self.temperature, self.weight, self.linear_steps = ensemble, temperature, weight, linear_steps
        self.needs = Needs(min_peers=2, views="per_peer")

    def target(self, rec: StepRecord) -> Tensor:
        """(B, K) ensemble logits, detached."""
        z = [o.logits.detach() for o in rec.outputs]
        q = rec.views[0].soft_targets(rec.num_classes)  # every view holds the same (identically mixed) images
        if self.ensemble == "linear":
            # fitted on the global batch under torchrun (no gradient: every rank gets the same weights)
            w = linear_ensemble_weights(global_batch(*z), *global_batch(q), self.linear_steps)  # (m,)
            return sum(w_i * f32(z_i) for w_i, z_i in zip(w, z))
        if self.ensemble == "minlogit":
            return min_logit_ensemble(z, q)
        return mean_logits(z)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        z_t = self.target(rec)
        terms: dict[str, Tensor] = {}
        for i, o in enumerate(rec.outputs):
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            terms[f"kl{i}"] = self.weight * kd_kl(o.logits, z_t, self.temperature)
        return terms
