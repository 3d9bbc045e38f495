"""SD-Dropout: self-knowledge distillation via dropout (Lee, Park, Seo & Kang, CVIU 2023, arXiv 2208.05642).

One implementation of the SDD term serves both the standalone method ``sd_dropout`` and the add-on
``addon=sd_dropout``, which adds the term to any method through the features it exposes
(:meth:`Method.feature_heads`): CS-KD's anchors, DDGSD's two views with one mask, BYOT's final
feature, each DML network with its own classifier.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PeerdistillError
from ..params import Fraction, Literal, NonNegative, Positive
from .base import ADDONS, METHODS, AddOn, DataInfo, FeatureHead, Method, Needs, StepRecord
from .functional import kd_kl

Variant = Literal["both", "forward", "reverse", "v2"]


class SDDTerm:
    """The SDD maths shared by the method and the add-on (reads ``beta``, ``temperature``, ``detach``,
    ``variant`` from the instance at call time)."""

    beta: float
    temperature: float
    detach: bool
    variant: str

    def sdd(self, z_u: Tensor, z_v: Tensor) -> Tensor:
        """``T^2 * L_SDD`` for the two dropped logits (kd_kl already carries the T^2)."""
        t = self.temperature
        if self.variant == "forward":
            return kd_kl(z_u, z_v, t)  # T^2 KL(sg(p_v) || p_u)
        if self.variant == "reverse":
            return kd_kl(z_v.detach(), z_u, t, detach_target=False)  # T^2 KL(p_u || sg(p_v))
        d = self.detach  # False (paper): both arguments of both terms receive the gradient
        return kd_kl(z_v, z_u, t, detach_target=d) + kd_kl(z_u, z_v, t, detach_target=d)  # KL_uv + KL_vu

    def term(self, fh: FeatureHead) -> Tensor:
        """``T^2 * L_SDD`` of one feature/classifier pair (before the weight lambda)."""
        def drop() -> Tensor:  # inverted dropout, always in training mode (authors' F.dropout(f, p))
            return F.dropout(fh.feature, p=self.beta, training=True)

        if self.variant == "v2":  # SD_Dropout_v2: un-dropped student, dropped teacher, T^2 KL(p_drop || p)
            return kd_kl(fh.head(fh.feature), fh.head(drop()), self.temperature, detach_target=self.detach)
        if fh.halves:  # DDGSD_Dropout: ONE mask over [f_1; f_2], view 1 against view 2
            z = fh.head(drop())  # (2B, K)
            half = z.shape[0] // 2
            return self.sdd(z[:half], z[half:])
        return self.sdd(fh.head(drop()), fh.head(drop()))  # z_u, then z_v: two independent masks


@METHODS.register("sd_dropout")
class SDDropout(SDDTerm, Method):
    """Each network distils between two dropout samples of its own pooled embedding, through its own classifier:
    forward plus reverse KL, on top of CE on the un-dropped logits (spec §6.1).


    With ``f`` the pooled penultimate feature (``PeerOutput.embedding``) and ``W, b`` the network's own
    classifier: ``f_u = u * f``, ``f_v = v * f`` with independent inverted-dropout masks (keep
    probability 1 - beta, scaled by 1/(1 - beta); ``F.dropout`` always in training mode, as in the
    authors' ``models/methods.py``), ``z_u = W f_u + b``, ``z_v = W f_v + b`` (no extra parameters), and

        L = CE(W f + b, y) + lam * T^2 * L_SDD,   L_SDD = KL(p_u || p_v) + KL(p_v || p_u),  p = softmax(z / T)

    where CE uses the non-dropped logits. ``variant`` picks L_SDD, with u the "student" sample and v
    the "target" sample:

    * ``"both"`` (paper): ``KL(p_u || p_v) + KL(p_v || p_u)``. With ``detach=False`` (the authors'
      default) the gradient flows through both samples of both terms; ``detach=True`` (their
      ``--detach``) stops it through the target of each term.
    * ``"forward"``: ``KL(sg(p_v) || p_u)``; ``"reverse"``: ``KL(p_u || sg(p_v))``; gradient into u only
      (u and v are i.i.d., so without the stop-gradient both would be the same objective up to
      relabelling). They isolate the forward and reverse gradients of the paper's Proposition 1.
    * ``"v2"`` (the authors' ``SD_Dropout_v2``): ONE dropout sample; the un-dropped logits z are the
      student and the dropped logits the teacher: ``T^2 KL(p_drop || p)``. As in their code the teacher
      is detached only with ``detach=True``.

    Defaults follow the authors' code: beta = 0.5, T = 3, lam = 1.0 when SD-Dropout is used alone
    (0.1 is their weight when it is added to another self-KD method: ``addon=sd_dropout``). ``peers=1``
    is the paper's setting; with more peers every network self-distils independently.

    Args:
        beta: dropout probability of the samples.
        temperature: T.
        lam: weight lambda_SDD of the SDD term (which carries the T^2 factor).
        detach: stop the gradient through each KL term's target (``variant="both"`` or ``"v2"``).
        variant: ``"both"``, ``"forward"``, ``"reverse"`` or ``"v2"`` (see above).
    """

    def __init__(self, beta: Fraction = 0.5, temperature: Positive = 3.0, lam: NonNegative = 1.0,
                 detach: bool = False, variant: Variant = "both") -> None:
        super().__init__()
        self.beta, self.temperature, self.lam = beta, temperature, lam
        self.detach, self.variant = detach, variant
        self.needs = Needs(default_peers=1)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for i, (o, fh) in enumerate(zip(rec.outputs, self.feature_heads(rec))):
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            terms[f"sdd{i}"] = self.lam * self.term(fh)
        return terms


@ADDONS.register("sd_dropout")
class SDDropoutAddOn(SDDTerm, AddOn):
    """SD-Dropout added to any method: ``sdd{i} = lam * T^2 * L_SDD`` on each of the method's dropout
    features (``method.feature_heads``), the authors' ``*_Dropout`` combinations in one add-on.

    The method decides what the term acts on: by default each network's pooled embedding with its own
    classifier (DML: each network with its own FC, BYOT: the final feature, CS-KD: the anchors); DDGSD
    gives both views as one feature with ``halves=True``: one mask over the 2B rows and the KL between
    the dropped outputs of view 1 and view 2 (spec §6.2). With ``halves`` the ``"both"``,
    ``"forward"`` and ``"reverse"`` variants take view 1 as u and view 2 as v; ``"v2"`` is per row.
    The variants and ``detach`` are those of method ``sd_dropout``.

    Defaults: the authors' combination setting lam = 0.1 (README "lam_sdd = 0.1, lam_kd = 1.0"),
    beta = 0.5, T = 3, no detach.

    Args:
        beta: dropout probability.
        temperature: T.
        lam: weight lambda_SDD of the term (which carries the T^2 factor).
        detach: stop the gradient through each KL term's target (``"both"`` or ``"v2"``).
        variant: ``"both"``, ``"forward"``, ``"reverse"`` or ``"v2"``.
    """

    def __init__(self, beta: Fraction = 0.5, temperature: Positive = 3.0, lam: NonNegative = 0.1,
                 detach: bool = False, variant: Variant = "both") -> None:
        super().__init__()
        self.beta, self.temperature, self.lam = beta, temperature, lam
        self.detach, self.variant = detach, variant

    def setup(self, method: Method, cohort: nn.Module, data: DataInfo) -> None:
        if isinstance(method, SDDropout):
            raise PeerdistillError("addon=sd_dropout on method=sd_dropout would add the SDD term twice; "
                                   "set method.lam instead")

    def losses(self, rec: StepRecord, method: Method) -> dict[str, Tensor]:
        return {f"sdd{i}": self.lam * self.term(fh) for i, fh in enumerate(method.feature_heads(rec))}

