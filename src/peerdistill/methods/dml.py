"""DML: deep mutual learning (Zhang et al., CVPR 2018)."""
from __future__ import annotations

from torch import Tensor

from ..params import NonNegative, Positive
from .base import METHODS, Method, Needs, StepRecord
from .functional import kd_kl


@METHODS.register("dml")
class DML(Method):
    """Each of N independent peers minimises ``CE + w * 1/(N-1) * sum_{j != i} T^2 KL(p_j || p_i)``,
    with the other peers' predictions detached, so all peers update simultaneously from one backward
    pass (equivalent to the paper's alternating per-peer updates with SGD up to the step order).

    Args:
        temperature: T. The paper uses 1; MCL-OKD's implementation uses 2 (with T^2 scaling).
        weight: weight of the mutual term.
    """

    def __init__(self, temperature: Positive = 1.0, weight: NonNegative = 1.0) -> None:
        super().__init__()
        self.temperature, self.weight = temperature, weight
        self.needs = Needs(min_peers=2)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        out = rec.outputs
        n = len(out)
        terms: dict[str, Tensor] = {}
        for i, o in enumerate(out):
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            kl = sum(kd_kl(o.logits, out[j].logits, self.temperature) for j in range(n) if j != i)
            terms[f"kl{i}"] = self.weight * kl / (n - 1)
        return terms
