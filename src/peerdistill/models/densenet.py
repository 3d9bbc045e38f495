"""The CIFAR "DenseNet-40-12" of the online-distillation literature (OKDDip, MCL-OKD, PCL).

Despite its name, the DenseNet-40-12 whose 0.19M parameters (CIFAR-100) appear in MCL-OKD's table
is a DenseNet-**BC** (Huang et al. 2017, §3): MCL-OKD's ``densenetd40k12``
(winycg/MCL-OKD, ``models/densenet.py``) uses growth 12, three dense blocks of 6 bottleneck layers
(BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k), transitions with compression 0.5, 24 initial
channels (2k) from a bare 3x3 stem conv, and a final BN-ReLU. Depth = 3 x 6 x 2 + 4 = 40.
The original DenseNet (L=40, k=12, no bottleneck, no compression) would have about 1.0M parameters.

Stage layout follows where those codes split peer branches (MCL-OKD's ``mcl_okd_densenet.py`` shares
``stem + block1 + transition1``): ``stage1`` = block1 + transition1, ``stage2`` = block2 +
transition2, ``stage3`` = block3 + final BN-ReLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MODELS, StagedNet, init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (``bn_size * growth``) - BN-ReLU-conv3x3 (``growth``); output is concatenated."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        mid = bn_size * growth
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compression) - 2x2 average pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, 2))


def densenet_bc(num_classes: int = 10, in_channels: int = 3, growth: int = 12,
                layers: tuple[int, ...] = (6, 6, 6), compression: float = 0.5, bn_size: int = 4,
                init_features: int | None = None) -> StagedNet:
    """Build a CIFAR DenseNet-BC.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        growth: growth rate ``k``.
        layers: bottleneck layers in each dense block.
        compression: channel factor of the transitions (``theta``).
        bn_size: bottleneck width in multiples of ``k``.
        init_features: stem channels (``2 * growth`` by default, as in DenseNet-BC).

    Returns:
        The network, with one stage per dense block; the last stage ends with the final BN-ReLU.
    """
    c = init_features if init_features is not None else 2 * growth
    stem = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)  # pre-activation: no BN/ReLU in the stem
    stages: list[tuple[str, nn.Module]] = []
    for i, n in enumerate(layers):
        mods: list[nn.Module] = []
        for _ in range(n):
            mods.append(DenseLayer(c, growth, bn_size))
            c += growth
        if i < len(layers) - 1:
            cout = int(c * compression)
            mods.append(Transition(c, cout))
            c = cout
        else:
            mods += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        stages.append((f"stage{i + 1}", nn.Sequential(*mods)))
    net = StagedNet(stem, stages, c, num_classes)
    init_weights(net)  # MCL-OKD uses He fan-in normal convs; the zoo's He fan-out differs only in scale
    return net


@MODELS.register("densenet40_12")
def densenet40_12(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """DenseNet-(BC)-40-12 of ONE/OKDDip/MCL-OKD: k=12, 3 x 6 bottleneck layers, compression 0.5.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 132 for the default configuration).
    """
    return densenet_bc(num_classes, in_channels)
