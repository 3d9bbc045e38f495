"""Contrastive maths of MCL and L-MCL (spec §3): SupCon over a logit matrix, the in-batch masks,
the projection head, and the four terms VCL / ICL / Soft VCL / Soft ICL for in-batch and memory-bank
contrast. Pure functions plus one small module; float32 even under autocast.

Notation: ``v`` holds L2-normalised embeddings, ``S_pq = v_p v_q^T / tau`` is the logit matrix of anchor
embedding set p against contrast set q, and for a logit matrix S with positive mask P and denominator
mask D (spec §3.1)::

    l(S) = -(1/B) sum_i w_i (1/|P_i|) sum_j P_ij (S_ij - log sum_k D_ik exp S_ik)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import f32, kd_kl

TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")


def einsum32(equation: str, *operands: Tensor) -> Tensor:
    """``torch.einsum`` in float32 even under autocast (which would run it in bf16 / fp16): similarities
    divided by tau = 0.07 need more than bf16's 8 bits of mantissa."""
    with torch.autocast(operands[0].device.type, enabled=False):
        return torch.einsum(equation, *(f32(o) for o in operands))


class ProjectionHead(nn.Module):
    """``Linear(d, f) -> ReLU -> Linear(f, f) -> L2-normalise`` (MCL's ``Embed``; f = 128)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(inplace=True), nn.Linear(dim_out, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(f32(self.net(x)), dim=1)  # (B, f)


def supcon(logits: Tensor, pos: Tensor, denom: Tensor, weights: Tensor | None = None) -> Tensor:
    """SupCon loss of logit rows: ``l(S)`` above, averaged over the rows.

    Args:
        logits: (R, K) logit rows.
        pos: (R, K) or broadcastable bool mask of the positives of each row.
        denom: bool mask of the entries in each row's softmax denominator.
        weights: optional (R,) per-row weights (L-MCL's layer-matching weights); still divided by R.

    A row without positives contributes 0 (the reference code would give NaN; the m-per-class sampler
    guarantees at least one).
    """
    s = f32(logits)
    log_z = torch.logsumexp(s.masked_fill(~denom, float("-inf")), dim=1, keepdim=True)  # (R, 1)
    pos = pos.expand_as(s).float()
    per_row = (pos * (s - log_z)).sum(1) / pos.sum(1).clamp_min(1.0)  # (R,) mean log-prob of positives
    if weights is not None:
        per_row = per_row * weights
    return -per_row.mean()


def batch_masks(labels: Tensor, include_self: bool = False) -> tuple[Tensor, Tensor]:
    """(B, B) positive and denominator masks of in-batch contrast.

    ``include_self=False`` (the MCL code, for VCL and ICL alike): positives ``P_ij = [y_i = y_j] - [i = j]``,
    denominator ``D_ij = 1 - [i = j]``, so the anchor's own column is neither positive nor negative.
    ``include_self=True`` (ICL option): the diagonal, i.e. the same image seen by the other network, is a
    positive and in the denominator.
    """
    same = labels.view(-1, 1) == labels.view(1, -1)  # (B, B)
    if include_self:
        return same, torch.ones_like(same)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~eye


def mutual_contrast(v: Tensor, pairs: Tensor, labels: Tensor, tau: float, temperature: float,
                    terms: tuple[str, ...] = TERMS, weights: Tensor | None = None, vcl_once: bool = False,
                    instance_positive: bool = False) -> dict[str, Tensor]:
    """In-batch VCL / ICL / Soft VCL / Soft ICL summed over embedding pairs (unweighted by alpha..lambda).

    For every pair (p, q) of ``pairs`` (spec §3.1, §3.2):

    * ICL: ``l(S_pq) + l(S_qp)``;  Soft ICL: ``KD_T(S_pq <- sg S_qp) + KD_T(S_qp <- sg S_pq)``;
    * VCL: ``l(S_pp) + l(S_qq)`` (``vcl_once``: ``sum_p l(S_pp)`` over the embedding sets instead, MCL's
      form); Soft VCL: ``KD_T(S_pp <- sg S_qq) + KD_T(S_qq <- sg S_pp)``.

    KD_T is :func:`kd_kl` over full rows (self-similarity included) at temperature T on top of ``/tau``.

    Args:
        v: (M, B, f) normalised embedding sets.
        pairs: (P, 2) long indices of the pairs (p, q), p != q.
        labels: (B,) labels defining the positives.
        tau: contrastive temperature.
        temperature: T of the soft terms.
        terms: which of :data:`TERMS` to compute (the others are skipped).
        weights: optional (P, B) weights of each pair's anchor rows (L-MCL layer matching).
        vcl_once: count each embedding set's VCL once, unweighted (MCL) instead of once per pair.
        instance_positive: for ICL, count the same image in the other set as a positive.
    """
    n_pairs, b = pairs.shape[0], v.shape[1]
    sim = einsum32("pbd,qcd->pqbc", v, v) / tau  # (M, M, B, B)
    p, q = pairs[:, 0], pairs[:, 1]
    w2 = None if weights is None else torch.cat([weights, weights]).reshape(-1)  # (2P*B,)
    self_pos, self_den = batch_masks(labels)
    out: dict[str, Tensor] = {}
    if "icl" in terms or "soft_icl" in terms:
        cross = torch.cat([sim[p, q], sim[q, p]]).reshape(-1, b)  # (2P*B, B): rows S_pq then S_qp
        if "icl" in terms:
            pos, den = batch_masks(labels, instance_positive)
            out["icl"] = 2 * n_pairs * supcon(cross, pos.repeat(2 * n_pairs, 1), den.repeat(2 * n_pairs, 1), w2)
        if "soft_icl" in terms:
            target = torch.cat([sim[q, p], sim[p, q]]).reshape(-1, b)
            out["soft_icl"] = 2 * n_pairs * kd_kl(cross, target, temperature, weights=w2)
    if "vcl" in terms or "soft_vcl" in terms:
        within = torch.cat([sim[p, p], sim[q, q]]).reshape(-1, b)  # rows S_pp then S_qq
        if "vcl" in terms and vcl_once:
            m = v.shape[0]
            own = torch.arange(m, device=sim.device)  # a host index would be copied and synchronised every step
            diag = sim[own, own].reshape(-1, b)  # (M*B, B)
            out["vcl"] = m * supcon(diag, self_pos.repeat(m, 1), self_den.repeat(m, 1))
        elif "vcl" in terms:
            out["vcl"] = 2 * n_pairs * supcon(within, self_pos.repeat(2 * n_pairs, 1),
                                              self_den.repeat(2 * n_pairs, 1), w2)
        if "soft_vcl" in terms:
            target = torch.cat([sim[q, q], sim[p, p]]).reshape(-1, b)
            out["soft_vcl"] = 2 * n_pairs * kd_kl(within, target, temperature, weights=w2)
    return out


def bank_logits(v: Tensor, banks: Tensor, idx: Tensor) -> Tensor:
    """(n, M, B, 2+K) dot products ``banks[i, idx[b, k]] . v[j, b]``, by the cheaper of two routes.

    Gathering the (n, B, 2+K, f) bank rows (the authors' route) moves n·B·(2+K)·f values; scoring every bank
    row once, (n, M, B, N), and picking the drawn ones moves n·M·B·N and runs as one GEMM. The second wins
    whenever it is the smaller tensor — Fashion-MNIST or CIFAR with the code's K = 8192: a 4.5x faster MCL
    step on a CPU core (docs/performance.md) — while ImageNet's N = 1.28 M keeps the gather.

    Args:
        v: (M, B, f) embedding sets (M = n for MCL; every (network, stage) for L-MCL).
        banks: (n, N, f) banks.
        idx: (B, 2+K) drawn bank rows of each anchor.
    """
    (m, b, f), (n, k) = v.shape, (banks.shape[0], idx.shape[1])
    if m * banks.shape[1] <= k * f:
        scores = einsum32("jbf,inf->ijbn", v, banks)  # (n, M, B, N)
        return scores.gather(3, idx.expand(n, m, b, k))
    mem = banks[:, idx.reshape(-1)].view(n, b, k, f)  # (n, B, 2+K, f)
    return einsum32("ibkf,jbf->ijbk", mem, v)


def bank_contrast(v: Tensor, banks: Tensor, idx: Tensor, tau: float, temperature: float,
                  terms: tuple[str, ...] = TERMS, pairs: Tensor | None = None, owner: Tensor | None = None,
                  weights: Tensor | None = None, vcl_once: bool = True, vcl_bank: str = "own") -> dict[str, Tensor]:
    """Memory-bank VCL / ICL / Soft VCL / Soft ICL: MCL's ImageNet form (``imagenet_sup_mcl_loss.py``) and,
    with ``pairs`` / ``owner`` / ``weights``, L-MCL's (``imagenet_sup_layer_mcl_meta_loss.py``).

    ``idx[:, 0]`` is each anchor's own dataset index, ``idx[:, 1]`` one same-class index, the rest
    different-class negatives. ``L(i, p) = M_i[idx] . v_p / tau`` scores embedding set p against the bank of
    network i; ``L'`` is the same without the own index (``idx[:, 1:]``). For every pair (p, q) of embedding
    sets, of networks a = owner[p], b = owner[q]:

    * ICL ``l(L(a, q)) + l(L(b, p))``, positives = the first two entries (own and same-class index);
    * Soft ICL ``KD_T(L(a, q) <- sg L(b, p)) + KD_T(L(b, p) <- sg L(a, q))``;
    * VCL ``l(L'(a, p)) + l(L'(c, q))``, the same-class entry the positive, with c = b (``vcl_bank=own``:
      each set against its own network's bank) or c = a (``vcl_bank=code``: L-MCL's ImageNet code scores
      both sets of the pair against network a's bank); ``vcl_once`` (MCL): ``sum_p l(L'(owner[p], p))``
      over the sets instead, once each and unweighted;
    * Soft VCL ``KD_T(L'(a, p) <- sg L'(c, q)) + KD_T(L'(c, q) <- sg L'(a, p))``.

    Args:
        v: (M, B, f) live normalised embeddings.
        banks: (n, N, f) memory banks (no gradient).
        idx: (B, 2 + K) long dataset indices.
        tau, temperature, terms: as :func:`mutual_contrast`.
        pairs: (P, 2) pairs of embedding sets; default every p < q (MCL's networks).
        owner: (M,) the network (bank) of each embedding set; default set m is network m.
        weights: optional (P, B) weights of each pair's anchor rows (L-MCL layer matching), every term.
        vcl_once: MCL's VCL, once per embedding set; else once per pair and set, weighted.
        vcl_bank: ``own`` or ``code``, see above.
    """
    m = v.shape[0]
    logits = bank_logits(v, banks.detach(), idx) / tau  # (n, M, B, 2+K)
    if pairs is None:
        pairs = torch.triu_indices(m, m, 1, device=v.device).T
    if owner is None:
        owner = torch.arange(m, device=v.device)
    p, q = pairs[:, 0], pairs[:, 1]
    a, b = owner[p], owner[q]
    c = a if vcl_bank == "code" else b
    k2, n_rows = logits.shape[-1], 2 * len(p)
    w2 = None if weights is None else torch.cat([weights, weights]).reshape(-1)  # (2P*B,)
    out: dict[str, Tensor] = {}
    if "icl" in terms or "soft_icl" in terms:
        cross = torch.cat([logits[a, q], logits[b, p]]).reshape(-1, k2)  # (2P*B, 2+K)
        if "icl" in terms:
            pos = torch.zeros_like(cross[:1], dtype=torch.bool)
            pos[:, :2] = True  # own index and the same-class index
            out["icl"] = n_rows * supcon(cross, pos, torch.ones_like(pos), w2)
        if "soft_icl" in terms:
            target = torch.cat([logits[b, p], logits[a, q]]).reshape(cross.shape)
            out["soft_icl"] = n_rows * kd_kl(cross, target, temperature, weights=w2)
    if "vcl" in terms or "soft_vcl" in terms:
        within = torch.cat([logits[a, p, :, 1:], logits[c, q, :, 1:]]).reshape(-1, k2 - 1)  # own index left out
        pos = torch.zeros_like(within[:1], dtype=torch.bool)
        pos[:, 0] = True  # the same-class index
        if "vcl" in terms and vcl_once:
            own = logits[owner, torch.arange(m, device=v.device), :, 1:].reshape(-1, k2 - 1)  # (M*B, 1+K)
            out["vcl"] = m * supcon(own, pos, torch.ones_like(pos))
        elif "vcl" in terms:
            out["vcl"] = n_rows * supcon(within, pos, torch.ones_like(pos), w2)
        if "soft_vcl" in terms:
            target = torch.cat([logits[c, q, :, 1:], logits[a, p, :, 1:]]).reshape(within.shape)
            out["soft_vcl"] = n_rows * kd_kl(within, target, temperature, weights=w2)
    return out
