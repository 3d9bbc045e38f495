"""CS-KD: class-wise self-knowledge distillation (Yun, Park, Lee & Shin, CVPR 2020)."""
from __future__ import annotations

from torch import Tensor

from ..data.loader import Batch
from ..data.samplers import PairSampler
from ..data.views import Extra, View, ViewContext, Views
from ..params import NonNegative, Positive
from .base import METHODS, Method, Needs, StepRecord
from .functional import kd_kl

PARTNER = "partner"  # extra input: the same-class partners, run without gradient


@METHODS.register("cs_kd")
class CSKD(Method):
    """Each network matches its softened prediction on an image to its own (no-grad) prediction on a
    random other image of the same class: ``CE(z(x)) + lam * T^2 KL(p(x'; T) || p(x; T))``.

    Batches come from the pair sampler (the official ``PairBatchSampler``): ``batch_size`` anchors, each
    with a partner drawn uniformly from its class (possibly itself), every image augmented on its own,
    so a step sees ``2 * batch_size`` images (256 for the official CIFAR batch of 128). The anchors are
    the peer view: the cross-entropy and the dropout features (``addon=sd_dropout``) use them only. The
    partners are an extra input the engine runs without gradient in train mode, after the anchors, as
    the official second ``net(...)`` under ``torch.no_grad()`` (it also updates the BN statistics).

    Under a mixer one draw mixes the anchors and, with the same partners, box and lambda, the partners:
    mixed partner i holds the same label mixture as mixed anchor i, so it stays a same-class target.

    Defaults (official CIFAR setting, baselines §7): T = 4, lam = 1 (fine-grained datasets: 3).
    With more peers every network self-distils independently on the same pairs.

    Args:
        temperature: T of the class-wise term.
        lam: weight lambda of the class-wise term (which carries the T^2 factor).
    """

    def __init__(self, temperature: Positive = 4.0, lam: NonNegative = 1.0) -> None:
        super().__init__()
        self.temperature, self.lam = temperature, lam
        self.needs = Needs(default_peers=1, sampler=PairSampler())

    def make_views(self, batch: Batch, ctx: ViewContext) -> Views:
        b = batch.images.shape[0] // 2  # the pair sampler puts the anchors first, partners after
        x = ctx.augment(batch.images)  # (2B, C, H, W): an independent augmentation per image
        anchor = View(x[:b], batch.labels[:b], batch.index[:b])
        partner = View(x[b:], batch.labels[b:], batch.index[b:])
        mix = ctx.mixer.draw(anchor.x, ctx.gen, ctx) if ctx.mixer is not None else None
        if mix is not None:
            anchor = View(mix.mix_images(anchor.x), anchor.labels, anchor.index, mix)
            partner = View(mix.mix_images(partner.x), partner.labels, partner.index, mix)
        n = ctx.n_peers
        return Views([anchor] * n, {PARTNER: Extra([partner] * n, grad=False)})

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for i, (o, p) in enumerate(zip(rec.outputs, rec.extra[PARTNER])):
            terms[f"ce{i}"] = rec.ce(o.logits, i)  # anchors only
            terms[f"cls{i}"] = self.lam * kd_kl(o.logits, p.logits, self.temperature)  # (B, K) vs sg (B, K)
        return terms
