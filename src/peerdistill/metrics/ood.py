"""Out-of-distribution detection: scores (MSP, ODIN, energy) and detection metrics (AUROC, AUPR, FPR95).

Every score is oriented so that **higher means "in-distribution"**; the metrics take the
in-distribution set as the positive class. The metrics use scikit-learn (the ``ood`` extra,
``pip install 'peerdistill[ood]'``); the scores need only torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PeerdistillError
from ..robust_options import ODIN_EPS, ODIN_T
from .robustness import Attacked, input_gradient



def msp(scores: Tensor) -> Tensor:
    """(B,) maximum softmax probability (Hendrycks & Gimpel 2017) of (B, K) logits or log-probabilities."""
    return F.softmax(scores.float(), dim=1).max(1).values


def energy(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """(B,) negative free energy ``T * logsumexp(z / T)`` (Liu et al. 2020: energy E = -T logsumexp(z/T);
    its negative is returned so that higher means in-distribution, like every score here)."""
    return temperature * torch.logsumexp(scores.float() / temperature, dim=1)


def is_log_prob(scores: Tensor, tol: float = 1e-4) -> bool:
    """Whether every row already is log-probabilities (``logsumexp == 0``), as ensemble heads are:
    their energy is identically 0 and says nothing, so it is not reported for them."""
    return bool((torch.logsumexp(scores.float(), dim=1).abs() < tol).all())


def odin_input(f: Attacked, x: Tensor, temperature: float = ODIN_T, eps: float = ODIN_EPS,
               step: Tensor | float = 1.0) -> Tensor:
    """ODIN's pre-processed input ``x - eps * step * sign(grad_x CE(f(x) / T, argmax f(x)))``.

    The step *lowers* the loss of the predicted class, i.e. raises its softmax score (ODIN eq. 2);
    in-distribution inputs gain more than out-of-distribution ones. ``step`` scales ``eps`` per
    channel, e.g. ``1 / std`` to express ``eps`` in [0, 1] pixel units on a normalised input as the
    released ODIN code does. No clipping (neither does ODIN).
    """
    with torch.no_grad():
        pred = f(x).argmax(1)
    grad = input_gradient(lambda v: f(v) / temperature, x, pred)
    return x.detach() - eps * step * grad.sign()


def odin(f: Attacked, x: Tensor, temperature: float = ODIN_T, eps: float = ODIN_EPS,
         step: Tensor | float = 1.0) -> Tensor:
    """(B,) ODIN score: the temperature-scaled maximum softmax of the perturbed input (Liang et al. 2018)."""
    x_t = odin_input(f, x, temperature, eps, step) if eps > 0 else x
    with torch.no_grad():
        return F.softmax(f(x_t) / temperature, dim=1).max(1).values


def sklearn_metrics() -> object:
    try:
        import sklearn.metrics as skm
    except ImportError:
        raise PeerdistillError("OOD detection metrics need scikit-learn: pip install 'peerdistill[ood]' "
                               "(or pip install scikit-learn)") from None
    return skm


FPR_RULES = ("highest", "odin")


def detection_metrics(score_in: np.ndarray, score_out: np.ndarray, tpr: float = 0.95,
                      fpr_rule: str = "highest") -> dict[str, float | None]:
    """AUROC, AUPR-in, AUPR-out and the FPR at ``tpr`` recall of the in-distribution set, all in %.

    AUPR-in ranks in-distribution samples as positives by the score; AUPR-out ranks the OOD samples
    as positives by the negated score (Hendrycks & Gimpel 2017). FPR95 (``fpr_rule``): ``highest``, the
    share of OOD samples scoring at or above the highest threshold that keeps ``tpr`` of the
    in-distribution samples; ``odin``, ODIN's ``calMetric.tpr95`` (:func:`fpr_odin`). On a few hundred
    samples the two can be several points apart.
    """
    skm = sklearn_metrics()
    s_in, s_out = np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)
    if len(s_in) == 0 or len(s_out) == 0:
        raise PeerdistillError("OOD metrics need samples on both sides (in- and out-of-distribution)")
    y = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    s = np.concatenate([s_in, s_out])
    if fpr_rule == "odin":
        at = fpr_odin(s_in, s_out, tpr)
    else:
        fpr, tpr_curve, _ = skm.roc_curve(y, s, drop_intermediate=False)
        at = fpr[np.searchsorted(tpr_curve, tpr - 1e-12, side="left")]
    return {"auroc": 100 * float(skm.roc_auc_score(y, s)),
            "aupr_in": 100 * float(skm.average_precision_score(y, s)),
            "aupr_out": 100 * float(skm.average_precision_score(1 - y, -s)),
            f"fpr{round(100 * tpr)}": None if math.isnan(at) else 100 * float(at)}  # None: no such threshold


def fpr_odin(s_in: np.ndarray, s_out: np.ndarray, tpr: float = 0.95, band: float = 5e-4) -> float:
    """ODIN's FPR at ``tpr`` (``calMetric.tpr95``): the mean, over every threshold d whose TPR
    ``mean(s_in >= d)`` is within ``band`` of ``tpr``, of ``mean(s_out > d)``. ODIN averages over a grid of
    100 000 thresholds on a fixed score range; this is that average with every threshold weighted alike
    (the grid's limit), exact from the sorted scores. NaN when no threshold has such a TPR."""
    cuts = np.unique(np.concatenate([s_in, s_out]))
    if len(cuts) < 2:
        return float("nan")
    mids, widths = (cuts[1:] + cuts[:-1]) / 2, np.diff(cuts)  # on each gap both rates are constant
    tprs = (s_in[None] >= mids[:, None]).mean(1)
    keep = np.abs(tprs - tpr) <= band + 1e-12
    if not keep.any():
        return float("nan")
    fprs = (s_out[None] > mids[keep][:, None]).mean(1)
    return float((fprs * widths[keep]).sum() / widths[keep].sum())


def output_scores(z: Tensor, energy_t: float = 1.0) -> dict[str, Tensor]:
    """The scores read off one forward's (B, K) outputs: MSP, and energy (NaN for log-probabilities)."""
    e = energy(z, energy_t) if not is_log_prob(z) else torch.full((len(z),), math.nan, device=z.device)
    return {"msp": msp(z), "energy": e}


def scores(f: Attacked, x: Tensor, names: Sequence[str], odin_t: float = ODIN_T, odin_eps: float = ODIN_EPS,
           odin_step: Tensor | float = 1.0, energy_t: float = 1.0) -> dict[str, Tensor]:
    """(B,) scores ``names`` (of msp, odin, energy) of ``x``: one forward for MSP and energy, ODIN its own
    gradient step."""
    out: dict[str, Tensor] = {}
    if {"msp", "energy"} & set(names):
        with torch.no_grad():
            out.update(output_scores(f(x), energy_t))
    if "odin" in names:
        out["odin"] = odin(f, x, odin_t, odin_eps, odin_step)
    return {k: out[k] for k in names}
