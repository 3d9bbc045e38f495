"""DML: deep mutual learning (Zhang et al., CVPR 2018)."""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..params import NonNegative, Positive
from .base import METHODS, Method, Needs, StepRecord
from .functional import kd_soft


@METHODS.register("dml")
class DML(Method):
    """Each of N independent peers minimises ``CE + w * 1/(N-1) * sum_{j != i} T^2 KL(p_j || p_i)``,
    with the other peers' predictions detached, so all peers update simultaneously from one backward
    pass (equivalent to the paper's alternating per-peer updates with SGD up to the step order).

    Under a mixer, ``p_j`` is always peer j's prediction for the image peer i saw. With ``mix=shared``
    (default) every peer sees the same mixed batch, so that is peer j's own output. With
    ``mix=per_view`` every peer gets its own mixing draw and ``kd_target`` says how ``p_j`` is made:
    ``rerun`` runs peer j again, without gradient, on peer i's mixed input (exact; N(N-1) extra
    forwards); ``components`` mixes peer j's no-grad predictions on the unmixed batch with peer i's
    label weights (N extra forwards; exact only for the labels, an approximation of the prediction).

    Args:
        temperature: T. The paper uses 1; MCL-OKD's implementation uses 2 (with T^2 scaling).
        weight: weight of the mutual term.
        mix: ``shared``: one mixing draw for every peer; ``per_view``: an independent draw per peer.
        kd_target: with ``mix=per_view``, ``rerun`` or ``components`` (see above); ignored otherwise.
    """

    def __init__(self, temperature: Positive = 1.0, weight: NonNegative = 1.0,
                 mix: Literal["shared", "per_view"] = "shared",
                 kd_target: Literal["rerun", "components"] = "rerun") -> None:
        super().__init__()
        self.temperature, self.weight = temperature, weight
        self.needs = Needs(min_peers=2, mix=mix, peer_targets=kd_target if mix == "per_view" else "own")

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        n, t = len(rec.outputs), self.temperature
        terms: dict[str, Tensor] = {}
        for i, o in enumerate(rec.outputs):
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            kl = sum(kd_soft(o.logits, rec.peer_target(j, i, t), t) for j in range(n) if j != i)
            terms[f"kl{i}"] = self.weight * kl / (n - 1)
        return terms
