"""ONE: on-the-fly native ensemble (Lan, Zhu & Gong, NeurIPS 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PeerdistillError
from ..params import NonNegative, Positive
from .base import METHODS, DataInfo, Method, Needs, PeerOutput, StepRecord
from .functional import f32, kd_kl, sigmoid_rampup


def _trunk_channels(net: nn.Module, shared: int) -> int:
    """Channels of the shared trunk's output, probed with one tiny no-grad eval-mode forward (the model
    contract exposes stage names, not stage widths; eval mode leaves the BN statistics untouched)."""
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))  # the stem's first conv
    p = next(net.parameters())
    was_training = net.training
    net.eval()
    with torch.no_grad():
        h = net.stem(torch.zeros(2, conv.in_channels, 32, 32, device=p.device, dtype=p.dtype))
        for stage in net.stages[:shared]:
            h = stage(h)
    net.train(was_training)
    return int(h.shape[1])


@METHODS.register("one")
class ONE(Method):
    """m branches on a shared trunk (a branched cohort) plus a gate that builds the teacher on the fly.

    Gate (official code ``models/cifar/resnet.py``, MCL-OKD ``models/one_resnet.py``): on the global
    average pool of the last shared stage, ``g = softmax(ReLU(BN(FC(gap))))`` with FC: C -> m; the
    teacher logits are ``z_e = sum_i g_i z_i``. Loss (spec §7):

        L = sum_i CE(z_i) + CE(z_e) + w(e) * sum_i T^2 KL(softmax(sg(z_e)/T) || softmax(z_i/T)),  T = 3

    CE(z_e) trains the gate, the branches and the trunk; the KD target is detached, so the KD terms
    never reach the gate. ``w(e) = weight`` in the paper. The official code multiplies the KD term by
    the 80-epoch sigmoid ramp-up ``exp(-5 (1 - e/80)^2)`` of the integer epoch (``--consistency_rampup
    80`` in its scripts): set ``rampup_epochs=80`` to reproduce it. Its KL adds 1e-7 to the target
    probabilities, a numerical detail we do not copy.

    The paper uses m = 3 branches on CIFAR (set ``peers=3``); MCL-OKD uses 4. The trunk is the stem and
    every stage but the last unless ``split_after`` names another stage. Evaluated heads: every
    branch, their probability ensemble, and ``gated`` (z_e).

    Args:
        temperature: T of the KD terms (3 in the paper and both codes).
        weight: weight of the KD terms.
        rampup_epochs: length of the sigmoid ramp-up of the KD weight; 0 disables it (paper).
        split_after: last shared stage; empty = all stages but the last.
    """

    def __init__(self, temperature: Positive = 3.0, weight: NonNegative = 1.0, rampup_epochs: NonNegative = 0.0,
                 split_after: str = "") -> None:
        super().__init__()
        self.temperature, self.weight, self.rampup_epochs = temperature, weight, rampup_epochs
        # The gated teacher combines the branches' logits on one input: one shared (mixed) view.
        self.needs = Needs(default_peers=3, min_peers=2, topology="branched", split_after=split_after or None)
        self.tap = ""
        self.gate_fc: nn.Linear | None = None
        self.gate_bn: nn.BatchNorm1d | None = None

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        if cohort.shared < 1:
            raise PeerdistillError("method 'one' needs a branched cohort with at least one shared stage")
        net, m = cohort.nets[0], len(cohort)
        self.tap = net.stage_names[cohort.shared - 1]
        self.needs.taps = (self.tap,)
        self.gate_fc = nn.Linear(_trunk_channels(net, cohort.shared), m)
        self.gate_bn = nn.BatchNorm1d(m)

    def gate(self, outputs: list[PeerOutput]) -> Tensor:
        """(B, m) branch weights from the shared trunk feature (identical in every branch's maps)."""
        fmap = outputs[0].maps[self.tap]  # (B, C, H, W)
        gap = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)  # (B, C)
        return F.softmax(f32(F.relu(self.gate_bn(self.gate_fc(gap)))), dim=1)

    def gated(self, outputs: list[PeerOutput]) -> Tensor:
        """Teacher logits ``z_e = sum_i g_i z_i`` (B, K), in float32."""
        g = self.gate(outputs)  # (B, m)
        z = torch.stack([f32(o.logits) for o in outputs], dim=1)  # (B, m, K)
        return (g.unsqueeze(2) * z).sum(1)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        z_e = self.gated(rec.outputs)
        w = self.weight * sigmoid_rampup(rec.epoch, self.rampup_epochs) if self.rampup_epochs > 0 else self.weight
        terms: dict[str, Tensor] = {f"ce{i}": rec.ce(o.logits, i) for i, o in enumerate(rec.outputs)}
        terms["ce_gated"] = rec.ce(z_e)
        for i, o in enumerate(rec.outputs):
            terms[f"kl{i}"] = w * kd_kl(o.logits, z_e, self.temperature)  # target detached: sg(z_e)
        return terms

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        heads = super().eval_heads(outputs, ema)
        heads["gated"] = self.gated(outputs)
        return heads
