"""Wide ResNets for CIFAR.

* ``wrn_D_K``: the pre-activation WRN-D-K of Zagoruyko & Komodakis (2016), as defined in
  CRD/RepDistiller ``models/wrn.py``: a bare 3x3 stem conv (16 channels), three stages of
  ``(D - 4) / 6`` pre-activation basic blocks of widths 16K/32K/64K, then a final BN-ReLU
  (kept inside ``stage3`` so that every ``stages[k:]`` suffix is a complete branch).
* ``wrn_20_8``: the "WRN-20-8" of the online-distillation papers (OKDDip, PCL, DKEL), which is *not*
  a pre-activation WRN: OKDDip's ``wide_resnet20_8`` (DefangChen/OKDDip,
  ``models/model_cifar/resnet.py``) is a post-activation bottleneck ResNet with [2, 2, 2] blocks
  and ``width_per_group = 64 * 8``, i.e. bottleneck inner widths 8x the planes (128/256/512)
  and outer widths 4x the planes (64/128/256).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import MODELS, StagedNet, init_weights
from .resnet import Bottleneck, conv_bn


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    When the shape changes, the 1x1 projection shortcut is applied to the *pre-activated* input,
    as in the WRN reference code (and CRD's copy of it).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.short = (None if cin == cout and stride == 1
                      else nn.Conv2d(cin, cout, 1, stride, 0, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        short = x if self.short is None else self.short(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + short


def wide_resnet(depth: int, widen: int, num_classes: int = 10, in_channels: int = 3,
                drop_rate: float = 0.0) -> StagedNet:
    """Build a pre-activation WRN-``depth``-``widen`` for small images.

    Args:
        depth: total depth, ``6n + 4``.
        widen: widening factor ``K`` (stage widths 16K, 32K, 64K).
        num_classes: number of output classes.
        in_channels: image channels.
        drop_rate: dropout between the two convolutions of every block (0 in CRD).

    Returns:
        The network, with stages ``stage1..stage3``; ``stage3`` ends with the final BN-ReLU.
    """
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth {depth} is not 6n+4")
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    cin = 16
    stages: list[tuple[str, nn.Module]] = []
    for i, w in enumerate(widths):
        blocks: list[nn.Module] = []
        for j in range(n):
            blocks.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1, drop_rate))
            cin = w
        if i == len(widths) - 1:  # the network's final BN-ReLU (before pooling) closes the last stage
            blocks += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)  # pre-activation: no BN/ReLU in the stem
    net = StagedNet(stem, stages, cin, num_classes)
    init_weights(net)  # CRD: N(0, sqrt(2 / (k*k*out))) convs = He fan-out, unit BN, zero biases
    return net


def _register_wrn(depth: int, widen: int) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
        return wide_resnet(depth, widen, num_classes, in_channels)

    factory.__doc__ = (f"Pre-activation WRN-{depth}-{widen} (Zagoruyko & Komodakis 2016; CRD's CIFAR "
                       f"definition), dropout 0.")
    MODELS.register(f"wrn_{depth}_{widen}")(factory)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 4)):
    _register_wrn(_d, _k)


@MODELS.register("wrn_20_8")
def wrn_20_8(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """WRN-20-8 as used by OKDDip / PCL / DKEL (not the pre-activation WRN of the WRN paper).

    Following OKDDip's ``wide_resnet20_8`` (torchvision-style ``ResNet(Bottleneck, [2, 2, 2],
    width_per_group=512)`` on a CIFAR stem): 3x3 conv-BN-ReLU stem with 16 channels, three stages of
    two post-activation bottlenecks with planes 16/32/64, inner width ``planes * 512 / 64``
    (128/256/512) and output ``4 * planes`` (64/128/256). Depth = 3 stages x 2 blocks x 3 convs + 2 = 20.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 256).
    """
    cin = 16
    stages: list[tuple[str, nn.Module]] = []
    for i, planes in enumerate((16, 32, 64)):
        blocks: list[nn.Module] = []
        for j in range(2):
            blocks.append(Bottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1, width=planes * 8))
            cin = planes * Bottleneck.expansion
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    net = StagedNet(conv_bn(in_channels, 16, 3), stages, cin, num_classes)
    init_weights(net)  # OKDDip: He fan-out convs, unit BN
    return net
