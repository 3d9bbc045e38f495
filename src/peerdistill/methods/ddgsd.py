"""DDGSD: data-distortion guided self-distillation (Xu & Liu, AAAI 2019)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..data.loader import Batch
from ..data.mix import MixRecord
from ..data.views import View, ViewContext, Views
from ..params import Literal, NonNegative, Positive
from .base import METHODS, FeatureHead, Method, Needs, StepRecord, global_batch
from .functional import f32, kd_kl


def stacked(mix: MixRecord, b: int) -> MixRecord:
    """The record of ``[x_1; x_2]`` when both halves are mixed by ``mix`` (same partners, box, lambda)."""
    return MixRecord(torch.cat([mix.perms, mix.perms + b], 1), torch.cat([mix.weights, mix.weights], 1),
                     torch.cat([mix.pixel_weights, mix.pixel_weights], 1))


@METHODS.register("ddgsd")
class DDGSD(Method):
    """Two independent distortions of every image must agree: CE on both, a symmetric KL between their
    predictions and a match of their batch-mean features.

    The views are ONE input ``[x_1; x_2]`` of 2B rows (two independent crop + flip draws of the same
    B images, as the SD-Dropout authors' duplicated-index ``DDGSD_Sampler``), so BatchNorm normalises
    both together. With z_1, z_2 the logits and f_1, f_2 the pooled features of the halves
    (baselines §8, the authors' ``models/methods.py`` ``DDGSD``, the version SD-Dropout
    combines with):

        L = ce_weight * [CE(z_1) + CE(z_2)] + lam * T^2 [KL(p_2 || p_1) + KL(p_1 || p_2)]  (targets detached)
            + mmd_weight * MMD,   MMD = || mean_b f_1 - mean_b f_2 ||^2  (summed over channels)

    with T = 3, lam = 1, mmd_weight = 0.005. No author code exists; Self-KD-Lib's DDGSD (the 76.61 in its
    CIFAR-100 table) differs in three ways, all options here: ``temperature=4``, ``ce_weight=0.25`` (its
    CE is half the mean over the 2B rows), ``mmd=scalar mmd_weight=5e-4`` (the squared difference of
    the two scalar means over all B x D entries). Under a mixer one draw mixes both halves alike, so the
    two views still show the same (mixed) images. The evaluated network is the single network on
    undistorted test images. ``feature_heads`` gives both halves as one feature with ``halves=True``
    (``addon=sd_dropout``: one mask over the 2B rows, view 1 against view 2).

    Args:
        temperature: T of the consistency KL.
        lam: weight lambda of the KL term (which carries the T^2 factor).
        ce_weight: weight of CE(z_1) + CE(z_2).
        mmd_weight: weight of the feature term.
        mmd: ``"channel"`` (squared L2 of the difference of the per-channel batch means) or ``"scalar"``
            (Self-KD-Lib: squared difference of the two overall means).
    """

    def __init__(self, temperature: Positive = 3.0, lam: NonNegative = 1.0, ce_weight: NonNegative = 1.0,
                 mmd_weight: NonNegative = 0.005, mmd: Literal["channel", "scalar"] = "channel") -> None:
        super().__init__()
        self.temperature, self.lam, self.ce_weight = temperature, lam, ce_weight
        self.mmd_weight, self.mmd = mmd_weight, mmd
        self.needs = Needs(default_peers=1, host_views=2)  # two distorted versions of each image

    def make_views(self, batch: Batch, ctx: ViewContext) -> Views:
        b = batch.images.shape[0]
        x = torch.cat([ctx.augment(batch.images), ctx.augment(batch.images)])  # (2B, C, H, W)
        labels, index = batch.labels.repeat(2), batch.index.repeat(2)
        mix = ctx.mixer.draw(x[:b], ctx.gen, ctx) if ctx.mixer is not None else None
        if mix is None:
            return Views([View(x, labels, index)] * ctx.n_peers)
        both = stacked(mix, b)
        return Views([View(both.mix_images(x), labels, index, both)] * ctx.n_peers)

    def feature_gap(self, f: Tensor) -> Tensor:
        """The MMD term of the (2B, D) pooled features of both halves. Under torchrun the means are the
        global batch's: every rank's (equal-sized) half-batch means, gathered with gradient, averaged."""
        f1, f2 = f32(f).chunk(2)
        (means,) = global_batch(torch.stack([f1.mean(0), f2.mean(0)])[None])  # (world, 2, D)
        m1, m2 = means.mean(0)
        if self.mmd == "scalar":
            return (m1.mean() - m2.mean()).pow(2)
        return (m1 - m2).pow(2).sum()

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        t = self.temperature
        for i, o in enumerate(rec.outputs):
            z1, z2 = o.logits.chunk(2)  # (B, K) each
            terms[f"ce{i}"] = self.ce_weight * 2.0 * rec.ce(o.logits, i)  # the 2B-row mean is (CE_1 + CE_2) / 2
            terms[f"kl{i}"] = self.lam * (kd_kl(z1, z2, t) + kd_kl(z2, z1, t))
            terms[f"mmd{i}"] = self.mmd_weight * self.feature_gap(o.embedding)
        return terms

    def feature_heads(self, rec: StepRecord) -> list[FeatureHead]:
        return [FeatureHead(o.embedding, head, halves=True) for o, head in zip(rec.outputs, rec.heads)]
