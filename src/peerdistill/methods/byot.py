"""BYOT: be your own teacher, auxiliary classifiers taught by the deepest one (Zhang et al., ICCV 2019)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import PeerdistillError
from ..models.base import init_weights
from ..params import Literal, NonNegative, Positive, Probability
from .base import METHODS, DataInfo, Method, Needs, PeerOutput, StepRecord, world_size
from .functional import ensemble_log_probs, f32, kd_kl


class AuxHead(nn.Module):
    """The ICCV-version bottleneck classifier on one stage map (baselines §9.1, ``branchBottleNeck``):
    1x1 conv -> BN -> ReLU -> k x k conv stride k -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> GAP -> FC,
    with D/4 middle channels and D (the final embedding width) out, so its pooled feature is comparable
    with the final one."""

    def __init__(self, c_in: int, width: int, k: int, num_classes: int) -> None:
        super().__init__()
        mid = max(width // 4, 1)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, k, stride=k), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) stage map -> logits (B, K) and pooled feature (B, D)."""
        feat = self.body(fmap).mean((2, 3))
        return self.fc(feat), feat


def stage_shapes(net: nn.Module, data: DataInfo) -> list[tuple[int, int]]:
    """(channels, height) of every stage map at the data's image size, from one tiny no-grad eval-mode
    forward (eval mode leaves the BN statistics untouched)."""
    p = next(net.parameters())
    was_training = net.training
    net.eval()
    with torch.no_grad():
        maps = net.forward_features(torch.zeros(2, data.in_channels, *data.image_size, device=p.device, dtype=p.dtype))
    net.train(was_training)
    return [(int(m.shape[1]), int(m.shape[2])) for m in maps.values()]


@METHODS.register("byot")
class BYOT(Method):
    """Bottleneck classifiers on every stage but the last learn from the labels, from the deepest
    classifier's softened prediction and from its pooled feature.

    Heads ``aux1 .. aux{L-1}`` (method-owned modules, built in ``setup`` from the network's stage widths)
    read the stage maps; the k x k stride-k conv of head i uses k = H_i / H_L so its map reaches the last
    stage's spatial size (ResNet-18 on 32x32: k = 8, 4, 2). With z, f the final logits and pooled
    feature and z_i, f_i those of head i, the default is the SD-Dropout authors' formula (``variant=skd``,
    the one SD-Dropout combines with; baselines §9.1):

        L = CE(z) + lam * sum_i [(1 - alpha) CE(z_i) + alpha T^2 KL(p^T(sg z) || p^T(z_i))
                                 + hint * mean_{b,c} (f_i - sg f)^2]

    with alpha = 0.1, T = 3, hint = 1e-6, lam = 1. ``variant=byotl`` is the ICCV re-implementation
    (``luanyunteng/pytorch-be-your-own-teacher``): the final CE is scaled by (1 - alpha) too, and the
    hint is the squared error summed over batch and channels (its mask ``f_i > 0 or f > 0`` changes
    nothing on post-ReLU features). Terms per head: ``ce_aux{i}``, ``kl_aux{i}``, ``hint_aux{i}``;
    ``ce0`` for the final head. Evaluated heads: the final head ``peer0``, every ``aux{i}``, and
    ``ensemble``, the probability mean of all of them. The dropout features (``addon=sd_dropout``) are
    the final feature. One network.

    Args:
        temperature: T of the KL from the deepest head.
        alpha: weight of the KL against (1 - alpha) on each auxiliary CE.
        hint: weight of the feature hint.
        lam: weight lambda_KD of all auxiliary terms (the authors' ``lam_kd``).
        variant: ``"skd"`` or ``"byotl"`` (see above).
    """

    def __init__(self, temperature: Positive = 3.0, alpha: Probability = 0.1, hint: NonNegative = 1e-6,
                 lam: NonNegative = 1.0, variant: Literal["skd", "byotl"] = "skd") -> None:
        super().__init__()
        self.temperature, self.alpha, self.hint, self.lam, self.variant = temperature, alpha, hint, lam, variant
        self.needs = Needs(peers=1, taps=("*",))
        self.aux = nn.ModuleList()
        self.stages: tuple[str, ...] = ()

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        net = cohort.nets[0]
        if len(net.stage_names) < 2:
            raise PeerdistillError("method 'byot' puts auxiliary classifiers on every stage but the last; this "
                                   "network has one stage (an adapted model: tap more layers, layers=[...])")
        shapes = stage_shapes(net, data)
        last = shapes[-1][1]
        self.stages = tuple(net.stage_names[:-1])
        self.aux = nn.ModuleList(AuxHead(c, net.num_features, max(h // last, 1), data.num_classes)
                                 for c, h in shapes[:-1])

    def heads_out(self, o: PeerOutput) -> list[tuple[Tensor, Tensor]]:
        """(logits, pooled feature) of every auxiliary head on one network output."""
        return [head(o.maps[name]) for name, head in zip(self.stages, self.aux)]

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        o, t, lam = rec.outputs[0], self.temperature, self.lam
        final_w = 1.0 - self.alpha if self.variant == "byotl" else 1.0
        terms: dict[str, Tensor] = {"ce0": final_w * rec.ce(o.logits)}
        f = f32(o.embedding.detach())  # (B, D) sg f: the hint target
        for i, (z_i, f_i) in enumerate(self.heads_out(o), start=1):
            sq = (f32(f_i) - f).pow(2)
            terms[f"ce_aux{i}"] = lam * (1.0 - self.alpha) * rec.ce(z_i)
            terms[f"kl_aux{i}"] = lam * self.alpha * kd_kl(z_i, o.logits, t)  # target detached
            # byotl's sum over the batch is the global batch's: DDP averages the ranks' gradients
            hint = sq.sum() * world_size() if self.variant == "byotl" else sq.mean()
            terms[f"hint_aux{i}"] = lam * self.hint * hint
        return terms

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        aux = [z for z, _ in self.heads_out(outputs[0])]
        heads.update({f"aux{i}": z for i, z in enumerate(aux, start=1)})
        heads["ensemble"] = ensemble_log_probs([outputs[0].logits, *aux])
        return heads
