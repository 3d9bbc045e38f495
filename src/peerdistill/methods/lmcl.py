"""L-MCL: layer-wise mutual contrastive learning with meta-learned layer matching (Yang et al., TPAMI 2023;
spec §3.2; code winycg/L-MCL ``main_layer_mcl_cifar_meta.py``)."""
from __future__ import annotations


import dataclasses

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.func import functional_call

from ..data.mix import MixRecord
from ..data.samplers import MPerClassSampler, Sampler
from ..data.views import View
from ..errors import PeerdistillError
from ..params import Decay, Literal, NonNegative, Positive, PositiveInt
from .base import (METHODS, DataInfo, Method, Needs, ParamGroup, PeerOutput, StepRecord, all_ranks, global_batch,
                   world_size)
from .bank import MemoryBank
from .contrastive import TERMS, ProjectionHead, bank_contrast, mutual_contrast
from .functional import kd_kl
from .lmcl_parts import AuxBranch, PairWeights, StageAggregator
from .meta import all_reduce_mean, nesterov_sgd_, unrolled_hypergradient


class _Unrolled(nn.Module):
    """Cohort + branches + projection heads as one module: what the meta step calls functionally."""

    def __init__(self, cohort: nn.Module, method: LMCL) -> None:
        super().__init__()
        self.cohort, self.branches, self.proj = cohort, method.branches, method.proj
        object.__setattr__(self, "method", method)  # not a submodule: no parameter seen twice

    def forward(self, x: Tensor, project: bool = True) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor | None]:
        outs = []
        for net in self.cohort.nets:
            maps = net.forward_features(x)
            emb = net.pool(maps[net.stage_names[-1]])
            outs.append(PeerOutput(net.classifier(emb), emb, maps))
        feats, logits = self.method.stages(outs)
        return feats, logits, self.method.project(feats) if project else None


@METHODS.register("lmcl")
class LMCL(MemoryBank, Method):
    """MCL on every stage: each network gets auxiliary branches (fresh copies of its later stages fed by
    each earlier stage, + GAP + FC), a projection head per (network, stage), and a stage aggregator; the
    VCL / ICL / Soft VCL / Soft ICL block runs over every ordered pair of networks and every pair of
    stages, each anchor row weighted by a meta-learned layer-matching weight.

    Loss (spec §3.2 step 3): ``sum_{m,k} CE(z_mk) + sum_m CE(agg_m) + sum_i sum_j KD_T(z_i,final <-
    sg agg_j) + alpha VCL + gamma SoftVCL + beta ICL + lambda SoftICL`` (tau = 0.1, T = 3). Terms:
    ``ce{m}`` (backbone), ``ce_aux{m}``, ``ce_agg{m}``, ``kd{m}``, ``vcl``, ``icl``, ``soft_vcl``, ``soft_icl``.
    Every ``meta_freq`` batches of an epoch (from the first, as the code) a meta step on the current
    batch: ``times`` virtual SGD steps of networks + projection heads on the weighted contrastive loss, one
    on the CE of all stages, and the exact hyper-gradient of that CE through the unrolled steps updates
    the weight network (its own Nesterov SGD, lr = current lr, momentum 0.9). ``meta=false``: uniform
    weights (the ablation). Evaluated heads: each backbone, ``ensemble``, and with ``eval_branches`` every
    auxiliary branch (``aux{m}_{stage}``) and aggregator (``agg{m}``).

    Memory-bank form (``contrast=bank``, the ImageNet code ``imagenet_sup_layer_mcl_meta_loss.py``): one
    bank per network (MCL's, :class:`~peerdistill.methods.bank.MemoryBank`), updated after the step with
    the network's final-stage projected embeddings; every (network, stage) embedding is contrasted against
    the banks by :func:`~peerdistill.methods.contrastive.bank_contrast`, each pair's rows weighted by the
    layer-matching weights; random batches, no mixer. The ImageNet code's constants are the bank form's
    defaults: tau = 0.07, alpha = beta = 0.01, a meta step every 500 batches.

    Args:
        alpha: weight of VCL; default 0.1 in-batch, 0.01 with the bank. beta: of ICL (same defaults).
        gamma: of Soft VCL. lam: of Soft ICL.
        tau: contrastive temperature; default 0.1 in-batch, 0.07 with the bank.
        temperature: T of the soft terms and the logit KD.
        feat_dim: projection width.
        meta: learn the layer-matching weights (False: all weights 1).
        meta_freq: a meta step every this many batches of an epoch; default 50 in-batch, 500 with the bank.
        times: virtual inner steps per meta step.
        meta_momentum: momentum of the virtual SGD and of the weight network's optimizer.
        instance_positive: ICL counts the same image in the other network as a positive.
        eval_branches: also evaluate the auxiliary branches and the aggregators.
        meta_batch: under torchrun, the batch of the meta step: ``global`` (every process gathers the
            global batch and computes the one-process hyper-gradient on it: N times the meta step's compute
            and memory per process) or ``local`` (each process on its own rows, the hyper-gradients
            averaged: not the one-process value). No effect in one process. In the bank form the global
            meta step also gathers every rank's bank draws, so it scores the banks as one process would.
        sampling: ``epoch`` (every image once per epoch) or ``per_batch`` (classes and images drawn afresh
            for every batch, the code's ``MPerClassSampler``); the same 2-per-class batches either way.
        contrast: ``batch`` (SupCon in the batch, the CIFAR code) or ``bank`` (memory bank, the ImageNet code).
        neg_k: bank negatives per sample (code 8192).
        bank_momentum: bank update ``M[i] <- normalise(m M[i] + (1 - m) v_i)``.
        vcl_bank: bank form, which bank the second set of a pair is scored against in VCL / Soft VCL:
            ``own`` (its own network's) or ``code`` (the first network's, as the ImageNet code does).
    """

    def __init__(self, alpha: NonNegative | None = None, beta: NonNegative | None = None, gamma: NonNegative = 1.0,
                 lam: NonNegative = 1.0, tau: Positive | None = None, temperature: Positive = 3.0,
                 feat_dim: PositiveInt = 128, meta: bool = True, meta_freq: PositiveInt | None = None,
                 times: PositiveInt = 2, meta_momentum: Decay = 0.9, instance_positive: bool = False,
                 eval_branches: bool = True, sampling: Literal["epoch", "per_batch"] = "epoch",
                 contrast: Literal["batch", "bank"] = "batch", neg_k: PositiveInt = 8192,
                 bank_momentum: Decay = 0.5, vcl_bank: Literal["own", "code"] = "own",
                 meta_batch: Literal["global", "local"] = "global") -> None:
        super().__init__()
        bank = contrast == "bank"
        if bank and instance_positive:
            raise PeerdistillError("method.instance_positive applies to contrast=batch; the bank's ICL "
                                   "already counts the own index as a positive")
        if bank and sampling != "epoch":
            raise PeerdistillError("method.sampling applies to contrast=batch; the bank form draws random batches")
        if not bank and vcl_bank != "own":
            raise PeerdistillError("method.vcl_bank applies to contrast=bank")
        small = 0.01 if bank else 0.1  # the ImageNet code's alpha = beta = 0.01, the CIFAR code's 0.1
        self.weights = dict(zip(TERMS, (small if alpha is None else alpha, small if beta is None else beta,
                                        gamma, lam)))
        self.tau = tau if tau is not None else (0.07 if bank else 0.1)  # code defaults
        self.temperature, self.feat_dim, self.meta = temperature, feat_dim, meta
        self.meta_freq = meta_freq if meta_freq is not None else (500 if bank else 50)
        self.times, self.meta_momentum = times, meta_momentum
        self.instance_positive, self.eval_branches, self.meta_batch = instance_positive, eval_branches, meta_batch
        self.bank, self.neg_k, self.bank_momentum, self.vcl_bank = bank, neg_k, bank_momentum, vcl_bank
        sampler = Sampler() if bank else MPerClassSampler(2, sampling == "per_batch")
        # the bank keeps one embedding per training image: a mixed image's embedding is not that image's
        self.needs = Needs(min_peers=2, taps=("*",), sampler=sampler, mixing=not bank)
        self.weight_net: PairWeights | None = None
        self.seed = 0
        self._pending: tuple[Tensor, Tensor] | None = None  # (index, final-stage v) for the bank update

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(t for t in TERMS if self.weights[t] > 0)

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        nets = list(cohort.nets)
        if not all(getattr(net, "splittable", True) for net in nets):
            raise PeerdistillError("method 'lmcl' copies each network's stages after every tap into auxiliary "
                                   "branches; an adapted nn.Module has no stages that can be copied")
        depth = [len(net.stage_names) for net in nets]
        self.offsets = [sum(depth[:m]) for m in range(len(nets))]
        self.branches = nn.ModuleList(nn.ModuleList(AuxBranch(list(net.stages[k + 1:]), net.num_features, data.num_classes)
                                                    for k in range(s - 1)) for net, s in zip(nets, depth))
        self.proj = nn.ModuleList(ProjectionHead(net.num_features, self.feat_dim) for net, s in zip(nets, depth)
                                  for _ in range(s))
        self.aggregators = nn.ModuleList(StageAggregator(net.num_features, s) for net, s in zip(nets, depth))
        # every ordered pair of networks (a, b), a != b, and every pair of their stages (k, z): code order
        pairs = [(self.offsets[a] + k, self.offsets[b] + z) for a in range(len(nets)) for b in range(len(nets))
                 if a != b for k in range(depth[a]) for z in range(depth[b])]
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.long), persistent=False)
        owner = [m for m, s in enumerate(depth) for _ in range(s)]  # the network of each (network, stage)
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long), persistent=False)
        self.register_buffer("finals", torch.tensor([o + s - 1 for o, s in zip(self.offsets, depth)]),
                             persistent=False)  # each network's backbone stage: what its bank stores
        if self.bank:
            self.setup_bank(len(nets), data, "lmcl")
        if self.meta:
            self.weight_net = PairWeights([net.num_features for net, s in zip(nets, depth) for _ in range(s)],
                                           self.pairs.clone()).requires_grad_(False)  # updated by the meta step only
            for j, p in enumerate(self.weight_net.parameters()):
                self.register_buffer(f"weight_momentum{j}", torch.zeros_like(p))
        object.__setattr__(self, "_unrolled", _Unrolled(cohort, self))

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup(list(self.weight_net.parameters()), optimized=False)] if self.weight_net is not None else []

    # ------------------------------------------------------------------ forward pieces
    def stages(self, outputs: list[PeerOutput]) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """Per network, the (B, d) embeddings and (B, K) logits of every stage: branches, then backbone."""
        feats, logits = [], []
        for o, net, branches in zip(outputs, self._unrolled.cohort.nets, self.branches):
            aux = [br(o.maps[net.stage_names[k]]) for k, br in enumerate(branches)]
            feats.append([e for e, _ in aux] + [o.embedding])
            logits.append([z for _, z in aux] + [o.logits])
        return feats, logits

    def project(self, feats: list[list[Tensor]]) -> Tensor:
        """(M, B, f) normalised embeddings of every (network, stage), flat in network-major order."""
        return torch.stack([self.proj[self.offsets[m] + k](h) for m, fs in enumerate(feats) for k, h in enumerate(fs)])

    def contrast(self, v: Tensor, w: Tensor | None, labels: Tensor, idx: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted contrastive terms: in-batch, or against the banks with the drawn indices ``idx``."""
        if idx is not None:
            raw = bank_contrast(v, self.banks, idx, self.tau, self.temperature, self.active, pairs=self.pairs,
                                owner=self.owner, weights=w, vcl_once=False, vcl_bank=self.vcl_bank)
        else:
            raw = mutual_contrast(v, self.pairs, labels, self.tau, self.temperature, self.active, weights=w,
                                  instance_positive=self.instance_positive)
        return {k: self.weights[k] * raw[k] for k in self.active}

    def bank_indices(self, rec: StepRecord) -> Tensor | None:
        """The step's bank draws (a function of the step: the meta step sees the same ones), or None."""
        return self.draw_indices(rec.index, rec.step) if self.bank else None

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        feats, logits = self.stages(rec.outputs)
        n, terms = len(feats), {}
        agg = [a(f, z) for a, f, z in zip(self.aggregators, feats, logits)]
        for m in range(n):
            terms[f"ce{m}"] = rec.ce(logits[m][-1], m)
            if len(logits[m]) > 1:
                terms[f"ce_aux{m}"] = torch.stack([rec.ce(z, m) for z in logits[m][:-1]]).sum()
            terms[f"ce_agg{m}"] = rec.ce(agg[m], m)
            terms[f"kd{m}"] = torch.stack([kd_kl(logits[m][-1], a, self.temperature) for a in agg]).sum()  # sg(agg_j)
        if self.active:
            w = None
            if self.weight_net is not None:
                with torch.no_grad():
                    w = self.weight_net([h.detach() for fs in feats for h in fs])  # (P, B)
            v = self.project(feats)
            if self.bank:  # per-sample terms against the banks: a mean over local rows, averaged by DDP
                terms.update(self.contrast(v, w, rec.labels, self.bank_indices(rec)))
                self._pending = (rec.index, v[self.finals].detach())
            else:  # the whole global batch contrasts, as in one process (gathered with gradient under torchrun)
                if w is not None:
                    (w,) = global_batch(w, dim=1)
                (v_all,), (labels,) = global_batch(v, dim=1), global_batch(rec.labels)
                terms.update(self.contrast(v_all, w, labels))
        return terms

    # ------------------------------------------------------------------ meta step
    def update(self, rec: StepRecord) -> None:
        if self._pending is not None:  # the bank first: the code's meta step sees the updated memory
            index, v = self._pending
            self._pending = None
            self.update_bank(index, v)
        if self.weight_net is not None and self.active and (rec.step % rec.steps_per_epoch) % self.meta_freq == 0:
            self.meta_step(rec)

    def meta_step(self, rec: StepRecord) -> None:
        """Hyper-gradient on this batch (under torchrun: on the global batch, or per process and averaged,
        by ``meta_batch``), then one Nesterov SGD step of the weight network
        (code: ``optim.SGD(lr, momentum 0.9, weight_decay, nesterov=True)``)."""
        lr = rec.lr  # the virtual steps and the weight network follow the run's schedule, as in the code
        idx = self.bank_indices(rec)  # this rank's rows of the global batch's bank draws (bank form)
        if self.meta_batch == "global" and world_size() > 1:
            # the global batch and its draws, both in rank order: the one-process meta step, on every rank
            grads = self.hypergradient(global_record(rec), lr, None if idx is None else all_ranks(idx)[0])
        else:
            grads = all_reduce_mean(self.hypergradient(rec, lr, idx))
        names = [k for k, _ in self.weight_net.named_parameters()]
        momenta = [getattr(self, f"weight_momentum{j}") for j in range(len(names))]
        nesterov_sgd_(list(self.weight_net.parameters()), [grads[k] for k in names], momenta, lr,
                      self.meta_momentum, rec.weight_decay)

    def hypergradient(self, rec: StepRecord, lr: float, idx: Tensor | None = None) -> dict[str, Tensor]:
        """d CE(theta') / d weight-network parameters, theta' = ``times`` virtual steps on the weighted
        contrastive loss + one on the CE of all stages, from the current networks and projection heads;
        ``idx``: the bank draws of ``rec``'s rows (bank form)."""
        model, x, labels = self._unrolled, rec.views[0].x, rec.labels
        theta = {k: p for k, p in model.named_parameters() if p.requires_grad}
        fixed = {k: p for k, p in model.named_parameters() if not p.requires_grad}
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN statistics move on copies only

        def run(th: dict[str, Tensor], project: bool) -> tuple:
            return functional_call(model, ({**fixed, **th}, buffers), (x,), {"project": project})

        def inner(th: dict[str, Tensor], lam: dict[str, Tensor]) -> Tensor:
            feats, _, v = run(th, True)
            w = functional_call(self.weight_net, lam, ([h for fs in feats for h in fs],))
            return torch.stack(list(self.contrast(v, w, labels, idx).values())).sum()

        def outer(th: dict[str, Tensor]) -> Tensor:
            _, logits, _ = run(th, False)
            return torch.stack([rec.ce(z, m) for m, zs in enumerate(logits) for z in zs]).sum()

        return unrolled_hypergradient(inner, outer, theta, dict(self.weight_net.named_parameters()), self.times,
                                      lr, self.meta_momentum, rec.weight_decay)

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        if self.eval_branches and all(o.maps for o in outputs):  # stage maps: the run's taps
            feats, logits = self.stages(outputs)
            for m, net in enumerate(self._unrolled.cohort.nets):
                for k, z in enumerate(logits[m][:-1]):
                    heads[f"aux{m}_{net.stage_names[k]}"] = z
                heads[f"agg{m}"] = self.aggregators[m](feats[m], logits[m])
        return heads


def global_record(rec: StepRecord) -> StepRecord:
    """``rec`` with its views replaced by the global batch's (inputs, labels, indices and mix records of
    every rank, in rank order; no gradient): what the meta step of one process sees."""
    done: dict[int, View] = {}
    for v in rec.views:
        if id(v) not in done:
            x, labels, index = (all_ranks(t)[0] for t in (v.x, v.labels, v.index))
            mix = None
            if v.mix is not None:  # a rank's source rows are offset by the rows of the ranks before it
                perms = v.mix.perms + tdist.get_rank() * v.mix.perms.shape[1]
                mix = MixRecord(*(all_ranks(t, dim=1)[0] for t in (perms, v.mix.weights, v.mix.pixel_weights)))
            done[id(v)] = View(x, labels, index, mix)
    return dataclasses.replace(rec, views=[done[id(v)] for v in rec.views])
