"""MSA: the mixed-sample online distillation framework of Shen et al. (arXiv 2206.12370), reconstructed.

Only the abstract is known (spec §4): a cohort trained with Cut^nMix, distilling with
"feature-level mutual learning" and a "self-ensemble teacher". The loss forms, their weights and the
teacher's construction below are our reading, each behind a switch, documented in docs/methods.md.
The mixer is not set here: the user (or a preset) sets ``mixer=cutnmix``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.loader import Batch
from ..data.views import Extra, View, ViewContext, Views
from ..errors import PeerdistillError
from ..params import Decay, NonNegative, Positive
from .base import METHODS, RERUN, UNMIXED, DataInfo, Method, Needs, PeerOutput, StepRecord, all_ranks
from .functional import (attention_transfer, channel_kl, ensemble_log_probs, f32, kd_soft, normalized_mse,
                         sigmoid_rampup)

CLEAN = "msa_clean"  # extra input: every peer, without gradient, on the unmixed view (temporal ensemble)


@METHODS.register("msa")
class MSA(Method):
    """Mixed-sample online distillation (reconstruction): DML's logit mutual learning, feature-level
    mutual learning between the peers' last-stage maps, and a self-ensemble teacher (EMA cohort or
    per-sample temporal ensemble); use with ``mixer=cutnmix``. Every part has a weight; 0 switches it off.

    Per peer i (targets detached; ``j`` runs over the other peers; ``p_j`` = peer j's prediction for
    the image peer i saw, see ``dml``):
    ``ce{i} = CE(z_i)``, ``kl{i} = weight/(N-1) sum_j KD_T(z_i, p_j)``,
    ``fml{i} = feat_weight/(N-1) sum_j D(F_i, F_j)`` with D = ``feat_loss`` on the last-stage maps, and
    ``se{i} = w(e) * se_weight * KD_Tse(z_i, q_i)`` with q_i the self-ensemble teacher's prediction.

    Args:
        temperature: T of the logit mutual-learning term (DML's default, 1).
        weight: weight of the logit mutual-learning term.
        feat_loss: ``at`` (attention transfer), ``mse`` (of L2-normalised maps) or ``kl`` (over the
            channel softmax at each position).
        feat_weight: weight of the feature term; 0 = off. 0.1 by a small measurement (1 stalls early
            training with ``at``; docs/methods.md).
        feat_temperature: temperature of ``feat_loss=kl``.
        se_teacher: ``ema``: the probability ensemble of an EMA copy of the cohort on the same image;
            ``temporal``: a per-sample temporal ensemble of the cohort's predictions on unmixed images.
        se_weight: weight of the self-ensemble-teacher term; 0 = off.
        se_temperature: its temperature (PCL's 3 for its temporal-mean teacher).
        ema_decay: decay of the EMA copy (0.999 with the mean-teacher warm-up, as PCL).
        ema_train_mode: run the EMA copy with batch statistics and its own BN buffers (PCL's code);
            default: eval mode with the peers' BN statistics copied.
        temporal_momentum: momentum of the temporal ensemble (0.6, Laine & Aila 2017), bias-corrected.
        temporal_from: ``pass``: mixed batches get an extra no-grad pass on their unmixed view;
            ``batches``: only batches the mixer left unmixed update the ensemble (free, but never with
            ``mixer.prob=1``).
        rampup_epochs: sigmoid ramp-up length of the teacher term; 0 = none (PCL uses 80).
        mix: ``shared`` or ``per_view`` mixing draws (see ``dml``).
        kd_target: with ``mix=per_view``: ``rerun`` or ``components`` (see ``dml``).
    """

    def __init__(self, temperature: Positive = 1.0, weight: NonNegative = 1.0,
                 feat_loss: Literal["at", "mse", "kl"] = "at", feat_weight: NonNegative = 0.1,
                 feat_temperature: Positive = 1.0, se_teacher: Literal["ema", "temporal"] = "ema",
                 se_weight: NonNegative = 1.0, se_temperature: Positive = 3.0, ema_decay: Decay = 0.999,
                 ema_train_mode: bool = False, temporal_momentum: Decay = 0.6,
                 temporal_from: Literal["pass", "batches"] = "pass", rampup_epochs: NonNegative = 0.0,
                 mix: Literal["shared", "per_view"] = "shared",
                 kd_target: Literal["rerun", "components"] = "rerun") -> None:
        super().__init__()
        if feat_weight > 0 and mix == "per_view" and kd_target == "components":
            raise PeerdistillError("method 'msa': feature mutual learning needs kd_target=rerun with mix=per_view "
                                   "(a mixed image's feature map is not a mix of the components' maps)")
        self.temperature, self.weight, self.feat_loss, self.feat_weight = temperature, weight, feat_loss, feat_weight
        self.feat_temperature, self.se_teacher, self.se_weight = feat_temperature, se_teacher, se_weight
        self.se_temperature, self.momentum, self.temporal_from = se_temperature, temporal_momentum, temporal_from
        self.rampup_epochs, self.tap = rampup_epochs, ""
        use_ema = se_weight > 0 and se_teacher == "ema"
        self.needs = Needs(min_peers=2, mix=mix, peer_targets=kd_target if mix == "per_view" else "own",
                           ema_decay=ema_decay if use_ema else None, ema_warmup="meanteacher",
                           ema_train_mode=ema_train_mode)
        self.temporal = se_weight > 0 and se_teacher == "temporal"

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        if self.feat_weight > 0:
            self.tap = cohort.nets[0].stage_names[-1]
            self.needs.taps = (self.tap,)
            check_maps(cohort.nets, self.tap, self.feat_loss, data)
        if self.temporal:  # N x K stored ensemble predictions and how often each sample was stored
            self.register_buffer("bank", torch.zeros(data.train_size, data.num_classes))
            self.register_buffer("seen", torch.zeros(data.train_size, dtype=torch.long))

    def make_views(self, batch: Batch, ctx: ViewContext) -> Views:
        """The default views; with ``temporal_from=pass``, plus the unmixed view of mixed batches."""
        if not (self.temporal and self.temporal_from == "pass") or ctx.mixer is None:
            return super().make_views(batch, ctx)
        bases: list[Tensor] = []  # the augmented, unmixed batch: the same draws as without the capture

        def capture(x: Tensor) -> Tensor:
            bases.append(ctx.augment(x))
            return bases[-1]

        views = super().make_views(batch, dataclasses.replace(ctx, augment=capture))
        if UNMIXED not in views.extra and any(v.mix is not None for v in views.peers):
            clean = View(bases[0], batch.labels, batch.index)
            views.extra[CLEAN] = Extra([clean if v.mix is not None else None for v in views.peers])
        return views

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        n, t = len(rec.outputs), self.temperature
        w_se = self.se_weight * sigmoid_rampup(rec.epoch, self.rampup_epochs)
        terms: dict[str, Tensor] = {}
        for i, o in enumerate(rec.outputs):
            others = [j for j in range(n) if j != i]
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            if self.weight > 0:
                kl = sum(kd_soft(o.logits, rec.peer_target(j, i, t), t) for j in others)
                terms[f"kl{i}"] = self.weight * kl / (n - 1)
            if self.feat_weight > 0:
                fml = sum(self.feature_loss(o.maps[self.tap], self.peer_map(rec, j, i)) for j in others)
                terms[f"fml{i}"] = self.feat_weight * fml / (n - 1)
            if self.se_weight > 0:
                q, valid = self.teacher_probs(rec, i)
                terms[f"se{i}"] = w_se * kd_soft(o.logits, q, self.se_temperature, valid)
        return terms

    def feature_loss(self, student: Tensor, target: Tensor) -> Tensor:
        """D(F_i, F_j) of ``feat_loss`` on (B, C, H, W) maps; the target is detached."""
        if self.feat_loss == "at":
            return attention_transfer(student, target)
        if self.feat_loss == "mse":
            return normalized_mse(student, target)
        return channel_kl(student, target, self.feat_temperature)

    def peer_map(self, rec: StepRecord, j: int, i: int) -> Tensor:
        """(B, C, H, W) peer j's last-stage map for the image peer i saw (its re-run under per-view mixing)."""
        key = RERUN.format(i)
        src = rec.extra[key][j] if key in rec.extra and j != i else rec.outputs[j]
        return src.maps[self.tap].detach()

    def teacher_probs(self, rec: StepRecord, i: int) -> tuple[Tensor, Tensor | None]:
        """(B, K) the self-ensemble teacher's softened prediction for peer i's image, and (B,) per-sample
        weights (``None``: all 1; the temporal ensemble has no target for a sample not yet stored)."""
        t = self.se_temperature
        if not self.temporal:  # the EMA peers that saw peer i's image: all of them unless mixed per view
            same = [k for k, v in enumerate(rec.views) if v is rec.views[i]]
            return torch.stack([F.softmax(f32(rec.ema[k].logits) / t, 1) for k in same]).mean(0), None
        seen = self.seen[rec.index]  # (B,)
        q = self.bank[rec.index] / (1.0 - torch.pow(self.momentum, seen)).clamp_min(1e-12)[:, None]
        mix = rec.views[i].mix
        if mix is None:
            return q, (seen > 0).float()
        return mix.mix(q), (seen[mix.perms] > 0).all(0).float()  # every component must have a target

    @torch.no_grad()
    def update(self, rec: StepRecord) -> None:
        """Temporal ensemble: ``Z <- m Z + (1 - m) mean_k softmax(z_k / T)`` on the unmixed images."""
        if not self.temporal:
            return
        logits = [clean_logits(rec, k) for k in range(len(rec.outputs))]
        if any(z is None for z in logits):  # a mixed batch without an unmixed pass (temporal_from=batches)
            return
        p = torch.stack([F.softmax(f32(z) / self.se_temperature, 1) for z in logits]).mean(0)  # (B, K)
        index, p = all_ranks(rec.index, p)
        self.bank[index] = self.momentum * self.bank[index] + (1.0 - self.momentum) * p
        self.seen[index] += 1

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        if ema:
            heads["ema_ensemble"] = ensemble_log_probs([o.logits for o in ema])
        return heads


def clean_logits(rec: StepRecord, k: int) -> Tensor | None:
    """Peer k's logits on its unmixed image: its own output, the unmixed pass, or ``None``."""
    if rec.views[k].mix is None:
        return rec.outputs[k].logits.detach()
    for name in (CLEAN, UNMIXED):
        if name in rec.extra and rec.extra[name][k] is not None:
            return rec.extra[name][k].logits
    return None


def check_maps(nets: nn.ModuleList, tap: str, feat_loss: str, data: DataInfo) -> None:
    """Refuse peers whose last-stage maps cannot be compared (no projection is learned; see the docs)."""
    if any(net.stage_names[-1] != tap for net in nets):
        raise PeerdistillError("method 'msa': feature mutual learning needs peers with the same stage names; "
                               "use one architecture or feat_weight=0")
    shapes = [map_shape(net, tap, data) for net in nets]
    key: Callable[[torch.Size], tuple[int, ...]] = (lambda s: tuple(s[1:])) if feat_loss == "at" else tuple
    if len({key(s) for s in shapes}) > 1:
        what = "spatial sizes" if feat_loss == "at" else "shapes (use feat_loss=at for peers of different widths)"
        raise PeerdistillError(f"method 'msa': the peers' last-stage maps differ in {what}: "
                               f"{', '.join('x'.join(map(str, s)) for s in shapes)}; or set feat_weight=0")


def map_shape(net: nn.Module, tap: str, data: DataInfo) -> torch.Size:
    """(C, H, W) of ``net``'s ``tap`` map for this data, from one tiny no-grad eval-mode forward (BN
    statistics untouched)."""
    p = next(net.parameters())
    was_training = net.training
    net.eval()
    with torch.no_grad():
        fmap = net.forward_features(torch.zeros(2, data.in_channels, *data.image_size, device=p.device))[tap]
    net.train(was_training)
    return fmap.shape[1:]
