"""L-MCL: layer-wise mutual contrastive learning with meta-learned layer matching (Yang et al., TPAMI 2023;
spec §3.2; code winycg/L-MCL ``main_layer_mcl_cifar_meta.py``)."""
from __future__ import annotations


import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data.samplers import MPerClassSampler
from ..errors import PeerdistillError
from ..params import Decay, Literal, NonNegative, Positive, PositiveInt
from .base import METHODS, DataInfo, Method, Needs, ParamGroup, PeerOutput, StepRecord
from .contrastive import TERMS, ProjectionHead, mutual_contrast
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
class LMCL(Method):
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

    Args:
        alpha: weight of VCL. beta: of ICL. gamma: of Soft VCL. lam: of Soft ICL.
        tau: contrastive temperature. temperature: T of the soft terms and the logit KD.
        feat_dim: projection width.
        meta: learn the layer-matching weights (False: all weights 1).
        meta_freq: a meta step every this many batches of an epoch.
        times: virtual inner steps per meta step.
        meta_momentum: momentum of the virtual SGD and of the weight network's optimizer.
        instance_positive: ICL counts the same image in the other network as a positive.
        eval_branches: also evaluate the auxiliary branches and the aggregators.
        sampling: ``epoch`` (every image once per epoch) or ``per_batch`` (classes and images drawn afresh
            for every batch, the code's ``MPerClassSampler``); the same 2-per-class batches either way.
    """

    def __init__(self, alpha: NonNegative = 0.1, beta: NonNegative = 0.1, gamma: NonNegative = 1.0,
                 lam: NonNegative = 1.0, tau: Positive = 0.1, temperature: Positive = 3.0,
                 feat_dim: PositiveInt = 128, meta: bool = True, meta_freq: PositiveInt = 50,
                 times: PositiveInt = 2, meta_momentum: Decay = 0.9, instance_positive: bool = False,
                 eval_branches: bool = True, sampling: Literal["epoch", "per_batch"] = "epoch") -> None:
        super().__init__()
        self.weights = dict(zip(TERMS, (alpha, beta, gamma, lam)))
        self.tau, self.temperature, self.feat_dim, self.meta = tau, temperature, feat_dim, meta
        self.meta_freq, self.times, self.meta_momentum = meta_freq, times, meta_momentum
        self.instance_positive, self.eval_branches = instance_positive, eval_branches
        self.needs = Needs(min_peers=2, taps=("*",), sampler=MPerClassSampler(2, sampling == "per_batch"))
        self.weight_net: PairWeights | None = None

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

    def contrast(self, v: Tensor, w: Tensor | None, labels: Tensor) -> dict[str, Tensor]:
        raw = mutual_contrast(v, self.pairs, labels, self.tau, self.temperature, self.active, weights=w,
                              instance_positive=self.instance_positive)
        return {k: self.weights[k] * raw[k] for k in self.active}

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
            terms.update(self.contrast(self.project(feats), w, rec.labels))
        return terms

    # ------------------------------------------------------------------ meta step
    def update(self, rec: StepRecord) -> None:
        if self.weight_net is not None and self.active and (rec.step % rec.steps_per_epoch) % self.meta_freq == 0:
            self.meta_step(rec)

    def meta_step(self, rec: StepRecord) -> None:
        """Hyper-gradient on this batch, averaged over processes, then one Nesterov SGD step of the
        weight network (code: ``optim.SGD(lr, momentum 0.9, weight_decay, nesterov=True)``)."""
        lr = rec.lr  # the virtual steps and the weight network follow the run's schedule, as in the code
        grads = all_reduce_mean(self.hypergradient(rec, lr))
        names = [k for k, _ in self.weight_net.named_parameters()]
        momenta = [getattr(self, f"weight_momentum{j}") for j in range(len(names))]
        nesterov_sgd_(list(self.weight_net.parameters()), [grads[k] for k in names], momenta, lr,
                      self.meta_momentum, rec.weight_decay)

    def hypergradient(self, rec: StepRecord, lr: float) -> dict[str, Tensor]:
        """d CE(theta') / d weight-network parameters, theta' = ``times`` virtual steps on the weighted
        contrastive loss + one on the CE of all stages, from the current networks and projection heads."""
        model, x, labels = self._unrolled, rec.views[0].x, rec.labels
        theta = {k: p for k, p in model.named_parameters() if p.requires_grad}
        fixed = {k: p for k, p in model.named_parameters() if not p.requires_grad}
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN statistics move on copies only

        def run(th: dict[str, Tensor], project: bool) -> tuple:
            return functional_call(model, ({**fixed, **th}, buffers), (x,), {"project": project})

        def inner(th: dict[str, Tensor], lam: dict[str, Tensor]) -> Tensor:
            feats, _, v = run(th, True)
            w = functional_call(self.weight_net, lam, ([h for fs in feats for h in fs],))
            return torch.stack(list(self.contrast(v, w, labels).values())).sum()

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
