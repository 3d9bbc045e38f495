"""MCL: mutual contrastive learning for online KD (Yang et al., AAAI 2022 / TPAMI 2023; spec §3.1)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.samplers import MPerClassSampler, Sampler
from ..errors import PeerdistillError
from ..params import Decay, Literal, NonNegative, Positive, PositiveInt
from .base import METHODS, DataInfo, Method, Needs, PeerOutput, StepRecord, global_batch
from .bank import MemoryBank
from .contrastive import TERMS, ProjectionHead, bank_contrast, mutual_contrast
from .functional import kd_kl, mean_logits


@METHODS.register("mcl")
class MCL(MemoryBank, Method):
    """N peers, each with a projection head (pooled feature -> 128-d unit vector), trained with CE plus
    contrastive terms within (VCL) and across (ICL) networks and the transfer of contrastive
    distributions (Soft VCL / Soft ICL): ``L = sum_m CE_m + alpha VCL + beta ICL + gamma SoftVCL + lambda SoftICL``.

    In-batch form (``contrast=batch``, the CIFAR code ``cifar_sup_mcl_loss.py``): batches of 2 images per
    class (``MPerClassSampler``), SupCon masks of the code (positives = same class minus self; for ICL the
    same masks, so the same image seen by the other network is neither positive nor negative;
    ``instance_positive=true`` counts it as a positive), tau = 0.1. Memory-bank form (``contrast=bank``,
    the ImageNet code): one N x 128 bank per network, positives = own index + one same-class index,
    ``neg_k`` different-class negatives, tau = 0.07, momentum-0.5 bank update after the optimizer step.
    Sums run over networks / pairs and are not averaged (code). Terms named ``ce{i}``, ``vcl``, ``icl``,
    ``soft_vcl``, ``soft_icl`` (+ ``kd{i}``); a zero weight skips its term.

    ``logit_distill=true`` adds the code's ``--logit-distill`` KD from the mean of the logits, by
    ``logit_rule``: ``cifar`` (``main_cifar.py``) ``KD_T(z_m <- sg(mean_j z_j))`` for both nets of a pair,
    or only for the last net of a larger cohort; ``imagenet`` (``main_imagenet.py``) only the last net, from
    the mean *not* detached (so the KD also trains the other nets); ``auto``: the rule of the code of the
    contrast form (``batch``: CIFAR, ``bank``: ImageNet). ``share=stage1`` shares the stem and stage 1
    across the peers (the code's MCL(x4) networks); the default is independent networks (MCL(x2)).
    Under a mixer the CE is mixed and the contrastive positives use each row's own (unmixed) label; the
    bank form refuses mixers (its rows are per-image embeddings).
    Evaluated heads: each peer, ``ensemble`` (mean probabilities) and ``logit_ensemble`` (mean logits:
    the code's sum-of-logits ensemble, same top-1).

    Args:
        alpha: weight of VCL. beta: of ICL. gamma: of Soft VCL. lam: of Soft ICL.
        tau: contrastive temperature; default 0.1 in-batch, 0.07 with the bank.
        temperature: T of the soft terms (on top of /tau) and of the logit KD.
        feat_dim: projection width.
        contrast: ``batch`` (SupCon in the batch) or ``bank`` (memory bank).
        instance_positive: ICL counts the other network's view of the same image as a positive.
        logit_distill: add the code's logit distillation from the mean-logit ensemble.
        logit_rule: ``cifar``, ``imagenet`` or ``auto`` (the code of the contrast form), see above.
        sampling: in-batch form: ``epoch`` (every image once per epoch) or ``per_batch`` (classes and
            images drawn afresh for every batch, the code's ``MPerClassSampler``).
        share: last stage shared by the peers (e.g. ``stage1``); empty = independent networks.
        neg_k: bank negatives per sample (code 8192; the README reports 4096 works as well).
        bank_momentum: bank update ``M[i] <- normalise(m M[i] + (1 - m) v_i)``.
    """

    def __init__(self, alpha: NonNegative = 0.1, beta: NonNegative = 0.1, gamma: NonNegative = 1.0,
                 lam: NonNegative = 1.0, tau: Positive | None = None, temperature: Positive = 3.0,
                 feat_dim: PositiveInt = 128, contrast: Literal["batch", "bank"] = "batch",
                 instance_positive: bool = False, logit_distill: bool = False,
                 logit_rule: Literal["auto", "cifar", "imagenet"] = "auto", share: str = "",
                 neg_k: PositiveInt = 8192, bank_momentum: Decay = 0.5,
                 sampling: Literal["epoch", "per_batch"] = "epoch") -> None:
        super().__init__()
        if contrast == "bank" and instance_positive:
            raise PeerdistillError("method.instance_positive applies to contrast=batch; the bank's ICL "
                                   "already counts the own index as a positive")
        if contrast == "bank" and sampling != "epoch":
            raise PeerdistillError("method.sampling applies to contrast=batch; the bank form draws random batches")
        self.weights = dict(zip(TERMS, (alpha, beta, gamma, lam)))
        self.tau = tau if tau is not None else (0.1 if contrast == "batch" else 0.07)  # code defaults
        self.temperature, self.feat_dim, self.contrast = temperature, feat_dim, contrast
        self.instance_positive, self.logit_distill = instance_positive, logit_distill
        self.logit_rule = logit_rule if logit_rule != "auto" else ("cifar" if contrast == "batch" else "imagenet")
        self.neg_k, self.bank_momentum = neg_k, bank_momentum
        # In-batch SupCon needs same-class partners in every batch: the code's MPerClassSampler(m=2).
        sampler = MPerClassSampler(2, sampling == "per_batch") if contrast == "batch" else Sampler()
        # The bank keeps one embedding per training image: a mixed image's embedding is not that image's.
        self.needs = Needs(min_peers=2, topology="branched" if share else "independent",
                           split_after=share or None, sampler=sampler, mixing=contrast == "batch")
        self.proj = nn.ModuleList()
        self.seed = 0
        self._pending: tuple[Tensor, Tensor] | None = None  # (index, v) for the bank update after the step

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(t for t in TERMS if self.weights[t] > 0)

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        self.proj = nn.ModuleList(ProjectionHead(net.num_features, self.feat_dim) for net in cohort.nets)
        if self.contrast == "bank":
            self.setup_bank(len(cohort), data, "mcl")

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        out, n = rec.outputs, len(rec.outputs)
        terms: dict[str, Tensor] = {f"ce{i}": rec.ce(o.logits, i) for i, o in enumerate(out)}
        if self.logit_distill:
            terms.update(self.logit_kd([o.logits for o in out]))
        if not self.active:
            return terms
        v = torch.stack([head(o.embedding) for head, o in zip(self.proj, out)])  # (n, B, f)
        if self.contrast == "bank":
            raw = bank_contrast(v, self.banks, self.draw_indices(rec.index, rec.step), self.tau, self.temperature,
                                self.active)
            self._pending = (rec.index, v.detach())
        else:
            pairs = torch.triu_indices(n, n, 1, device=v.device).T  # a < b
            # the whole global batch contrasts, as in one process (gathered with gradient under torchrun)
            (v_all,), (labels,) = global_batch(v, dim=1), global_batch(rec.labels)
            raw = mutual_contrast(v_all, pairs, labels, self.tau, self.temperature, self.active, vcl_once=True,
                                  instance_positive=self.instance_positive)
        terms.update({k: self.weights[k] * raw[k] for k in self.active})
        return terms

    def logit_kd(self, logits: list[Tensor]) -> dict[str, Tensor]:
        """The code's logit distillation from the mean of the logits, by ``logit_rule``."""
        n, z_bar, t = len(logits), mean_logits(logits), self.temperature
        if self.logit_rule == "imagenet":  # main_imagenet.py: the last net only, the mean not detached
            return {f"kd{n - 1}": kd_kl(logits[-1], z_bar, t, detach_target=False)}
        # main_cifar.py: the mean detached; both nets of a pair, else only the last net
        return {f"kd{i}": kd_kl(logits[i], z_bar, t) for i in (range(n) if n == 2 else [n - 1])}

    def update(self, rec: StepRecord) -> None:
        """Bank update with this step's embeddings (all ranks' rows under torchrun, so banks agree)."""
        if self._pending is not None:
            index, v = self._pending
            self._pending = None
            self.update_bank(index, v)

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        heads["logit_ensemble"] = mean_logits([o.logits for o in outputs])
        return heads
