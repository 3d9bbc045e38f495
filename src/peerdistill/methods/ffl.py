"""FFL: feature fusion for online mutual knowledge distillation (Kim et al., ICPR 2021)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PeerdistillError
from ..params import NonNegative, Positive
from .base import METHODS, DataInfo, Method, Needs, ParamGroup, PeerOutput, StepRecord
from .functional import kd_kl, mean_logits, sigmoid_rampup


class FusionModule(nn.Module):
    """Concatenated last maps -> depthwise 3x3 -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> GAP -> Linear
    (official ``our_network.py`` ``Fusion_module``, generalised from 2 x C to any sum of channels)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.pointwise = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)  # PyTorch's default init, as the official code
        for conv in (self.depthwise, self.pointwise):  # official: N(0, sqrt(2 / (k * k * C_out)))
            k = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / k))

    def forward(self, maps: list[Tensor]) -> Tensor:
        x = torch.cat(maps, dim=1)  # (B, sum C_i, H, W)
        x = F.relu(self.bn1(self.depthwise(x)))
        x = F.relu(self.bn2(self.pointwise(x)))  # (B, C, H, W)
        return self.fc(x.mean((2, 3)))  # (B, K)


def _last_maps(cohort: nn.Module, data: DataInfo) -> list[tuple[int, ...]]:
    """(C, H, W) of every peer's last stage map, probed with a one-image no-grad eval-mode forward (eval
    mode leaves the BN statistics untouched); the branches of a shared trunk are one architecture."""
    p = next(cohort.parameters())
    x = torch.zeros(1, data.in_channels, *data.image_size, device=p.device, dtype=p.dtype)
    nets = list(cohort.nets)[:1] if cohort.shared else list(cohort.nets)
    was_training = cohort.training
    cohort.eval()
    with torch.no_grad():
        shapes = [tuple(net.forward_features(x)[net.stage_names[-1]].shape[1:]) for net in nets]
    cohort.train(was_training)
    return shapes * len(cohort) if cohort.shared else shapes


@METHODS.register("ffl")
class FFL(Method):
    """Sub-networks plus a fusion module over their last feature maps: the fused classifier teaches the
    sub-networks, and the sub-networks' ensemble teaches the fused classifier.

    Loss (official ``train_FFL.py``), with ``z_f`` the fusion module's logits:

        L = sum_i CE(z_i) + CE(z_f) + w(e) [sum_i KD_T(z_i, sg z_f) + KD_T(z_f, sg(mean_i z_i))],  T = 3

    and the 80-epoch sigmoid ramp-up w(e). The fusion module (concat -> depthwise 3x3 -> BN -> ReLU ->
    1x1 conv to C -> BN -> ReLU -> GAP -> Linear(C -> K); C = the mean of the sub-networks' widths) is
    trained with its own weight decay 1e-5, as the official second optimizer. ``shared=true`` (default,
    the official code: 2 branches on a shared trunk, i.e. FFL-S in the PCL table) builds a branched
    cohort; ``shared=false`` trains independent, possibly heterogeneous sub-networks
    (``model=resnet8,resnet14``) whose last maps must agree in spatial size. Which setting the paper calls
    FFL-S is unverified (baselines §6). Evaluated heads: every sub-network, their probability
    ensemble, and ``fused``.

    Args:
        temperature: T of the KD terms.
        weight: weight of the KD terms.
        rampup_epochs: length of the sigmoid ramp-up of the KD weight; 0 disables it.
        shared: share the low layers (a branched cohort) or train independent sub-networks.
        fusion_weight_decay: weight decay of the fusion module's parameters.
        split_after: with ``shared``, the last shared stage; empty = all stages but the last.
    """

    def __init__(self, temperature: Positive = 3.0, weight: NonNegative = 1.0, rampup_epochs: NonNegative = 80.0,
                 shared: bool = True, fusion_weight_decay: NonNegative = 1e-5, split_after: str = "") -> None:
        super().__init__()
        self.temperature, self.weight, self.rampup_epochs = temperature, weight, rampup_epochs
        self.fusion_weight_decay = fusion_weight_decay
        if split_after and not shared:
            raise PeerdistillError("method 'ffl': split_after needs shared=true (independent sub-networks share nothing)")
        self.needs = Needs(min_peers=2, topology="branched" if shared else "independent",
                           split_after=split_after or None)
        self.taps_by_peer: list[str] = []
        self.fusion: FusionModule | None = None

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        shapes = _last_maps(cohort, data)
        if len({s[1:] for s in shapes}) > 1:
            raise PeerdistillError(f"method 'ffl' fuses the sub-networks' last maps, which must agree in spatial "
                                   f"size; got {', '.join('x'.join(map(str, s[1:])) for s in shapes)}")
        self.taps_by_peer = [net.stage_names[-1] for net in cohort.nets]
        # One tap name for all peers when they agree; every stage otherwise (heterogeneous stage names).
        self.needs.taps = (self.taps_by_peer[0],) if len(set(self.taps_by_peer)) == 1 else ("*",)
        channels = [s[0] for s in shapes]
        self.fusion = FusionModule(sum(channels), round(sum(channels) / len(channels)), data.num_classes)

    def fused(self, outputs: list[PeerOutput]) -> Tensor:
        """(B, K) the fusion module's logits on the peers' last maps."""
        return self.fusion([o.maps[tap] for o, tap in zip(outputs, self.taps_by_peer)])

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        z_f = self.fused(rec.outputs)
        w = self.weight * sigmoid_rampup(rec.epoch, self.rampup_epochs)
        terms: dict[str, Tensor] = {f"ce{i}": rec.ce(o.logits, i) for i, o in enumerate(rec.outputs)}
        terms["ce_fused"] = rec.ce(z_f)
        for i, o in enumerate(rec.outputs):
            terms[f"kl{i}"] = w * kd_kl(o.logits, z_f, self.temperature)  # sg(z_f)
        terms["kl_fused"] = w * kd_kl(z_f, mean_logits([o.logits for o in rec.outputs]), self.temperature)
        return terms

    def param_groups(self) -> list[ParamGroup]:
        # Official: the fusion module has its own SGD with weight decay 1e-5 (the network's is 1e-4).
        return [ParamGroup(list(self.fusion.parameters()), weight_decay=self.fusion_weight_decay)]

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        heads["fused"] = self.fused(outputs)
        return heads
