"""SD-Dropout: self-knowledge distillation via dropout (Lee, Park, Seo & Kang, CVIU 2023, arXiv 2208.05642)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..params import Fraction, Literal, NonNegative, Positive
from .base import METHODS, Method, Needs, StepRecord
from .functional import kd_kl


@METHODS.register("sd_dropout")
class SDDropout(Method):
    """Each network distils between two dropout samples of its own pooled embedding (methods.md §6.1).

    With ``f`` the pooled penultimate feature (``PeerOutput.embedding``) and ``W, b`` the network's own
    classifier: ``f_u = u * f``, ``f_v = v * f`` with independent inverted-dropout masks (keep
    probability 1 - beta, scaled by 1/(1 - beta); ``F.dropout`` always in training mode, as in the
    authors' ``models/methods.py``), ``z_u = W f_u + b``, ``z_v = W f_v + b`` (no extra parameters), and

        L = CE(W f + b, y) + lam * T^2 * L_SDD,   L_SDD = KL(p_u || p_v) + KL(p_v || p_u),  p = softmax(z / T)

    where CE uses the non-dropped logits. ``variant`` picks L_SDD, with u the "student" sample and v
    the "target" sample:

    * ``"both"`` (paper): the forward plus the reverse KL above. With ``detach=False`` (the authors'
      default) the gradient flows through both samples of both terms; ``detach=True`` (their
      ``--detach``) stops it through the target of each term, so each sample is only the student
      (second argument) of one term.
    * ``"forward"``: ``KL(sg(p_v) || p_u)``, the usual KD direction, gradient into u only.
    * ``"reverse"``: ``KL(p_u || sg(p_v))``, gradient into u only.

      The single-direction variants always stop the gradient through v: u and v are i.i.d., so
      without it the two would be the same objective up to relabelling. They isolate the forward and
      reverse gradients the paper's analysis compares (Proposition 1); ``detach`` applies to
      ``"both"`` only.

    Defaults follow the authors' code: beta = 0.5, T = 3, lam = 1.0 when SD-Dropout is used alone
    (0.1 is their weight when it is added to another self-KD method). ``peers=1`` is the paper's
    setting; with more peers every network self-distils independently and nothing is exchanged.

    Args:
        beta: dropout probability of the two samples.
        temperature: T.
        lam: weight lambda_SDD of the SDD term (which carries the T^2 factor).
        detach: stop the gradient through each KL term's target (``variant="both"``).
        variant: ``"both"``, ``"forward"`` or ``"reverse"`` (see above).
    """

    def __init__(self, beta: Fraction = 0.5, temperature: Positive = 3.0, lam: NonNegative = 1.0,
                 detach: bool = False, variant: Literal["both", "forward", "reverse"] = "both") -> None:
        super().__init__()
        self.beta, self.temperature, self.lam = beta, temperature, lam
        self.detach, self.variant = detach, variant
        self.needs = Needs(peers=None)

    def sdd(self, z_u: Tensor, z_v: Tensor) -> Tensor:
        """``T^2 * L_SDD`` for the two dropped logits (kd_kl already carries the T^2)."""
        t = self.temperature
        if self.variant == "forward":
            return kd_kl(z_u, z_v, t)  # T^2 KL(sg(p_v) || p_u)
        if self.variant == "reverse":
            return kd_kl(z_v.detach(), z_u, t, detach_target=False)  # T^2 KL(p_u || sg(p_v))
        d = self.detach  # False (paper): both arguments of both terms receive the gradient
        return kd_kl(z_v, z_u, t, detach_target=d) + kd_kl(z_u, z_v, t, detach_target=d)  # KL_uv + KL_vu

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for i, (o, head) in enumerate(zip(rec.outputs, rec.heads)):
            f = o.embedding  # (B, D)
            z_u = head(F.dropout(f, p=self.beta, training=True))  # (B, K)
            z_v = head(F.dropout(f, p=self.beta, training=True))
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            terms[f"sdd{i}"] = self.lam * self.sdd(z_u, z_v)
        return terms
