"""The methods' loss functions alone, for users who want only the maths (docs/api.md).

Every function is the one the registered methods call (or a few lines composing them), so a term computed
here equals that method's term on the same tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.contrastive import TERMS, mutual_contrast
from ..methods.functional import cross_entropy, kd_kl, kd_soft, mean_logits, soft_ce
from ..methods.sd_dropout import SDDTerm
from ..methods.base import FeatureHead

__all__ = ["cross_entropy", "soft_ce", "kd_kl", "kd_soft", "mean_logits", "dml_mutual", "mcl_contrast",
           "sd_dropout_term"]


def dml_mutual(logits: Sequence[Tensor], temperature: float = 1.0) -> list[Tensor]:
    """DML's mutual term of every peer: ``1/(N-1) sum_{j != i} T^2 KL(p_j || p_i)``, the other peers'
    predictions detached (method ``dml``'s ``kl{i}`` before its ``weight``)."""
    n = len(logits)
    if n < 2:
        raise ValueError("DML's mutual term needs at least 2 peers")
    targets = [F.softmax(z.detach().float() / temperature, dim=1) for z in logits]
    return [sum(kd_soft(z, targets[j], temperature) for j in range(n) if j != i) / (n - 1)
            for i, z in enumerate(logits)]


def mcl_contrast(embeddings: Sequence[Tensor], labels: Tensor, tau: float = 0.1, temperature: float = 3.0,
                 terms: Sequence[str] = ("vcl", "icl")) -> dict[str, Tensor]:
    """MCL's in-batch Vanilla and Interactive Contrastive Learning (VCL / ICL, and their soft forms
    ``soft_vcl`` / ``soft_icl``) over every pair of peers' projected embeddings (each (B, f); normalised
    here), same-label rows as positives, as method ``mcl`` with ``contrast=batch`` (before its weights)."""
    bad = [t for t in terms if t not in TERMS]
    if bad:
        raise ValueError(f"unknown MCL term {bad[0]!r}; choose from {', '.join(TERMS)}")
    v = F.normalize(torch.stack(list(embeddings)), dim=2)
    n = v.shape[0]
    pairs = torch.triu_indices(n, n, 1, device=v.device).T
    return mutual_contrast(v, pairs, labels, tau, temperature, tuple(terms), vcl_once=True)


class _SDD(SDDTerm):
    def __init__(self, beta: float, temperature: float, detach: bool, variant: str) -> None:
        self.beta, self.temperature, self.detach, self.variant = beta, temperature, detach, variant


def sd_dropout_term(feature: Tensor, head: nn.Linear, beta: float = 0.5, temperature: float = 3.0,
                    detach: bool = False, variant: str = "both") -> Tensor:
    """SD-Dropout's self-distillation term of one network: ``T^2`` times the KL divergences between the
    classifier's predictions on two dropout samples of the pooled ``feature`` (method ``sd_dropout``'s
    term before its weight ``lam``)."""
    return _SDD(beta, temperature, detach, variant).term(FeatureHead(feature, head))
