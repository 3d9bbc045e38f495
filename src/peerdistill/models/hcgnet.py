"""HCGNet-A1 / A2 for CIFAR (Yang et al., "Gated Convolutional Networks with Hybrid Connectivity for
Image Classification", AAAI 2020), as defined in the authors' ``models/HCGNet_CIFAR.py``
(winycg/HCGNet) and its copy in MCL's / MCL-OKD's ``models/hcgnet.py``, whose tables report them.

A bare 3x3 stem conv (``2 * growth[0]`` channels), three hybrid blocks of 8 "SMG" modules, two
transitions, a final BN-ReLU. An SMG module is a DenseNet-style bottleneck (BN-ReLU-1x1 to
``4 * growth``, BN-ReLU-3x3 with 4 groups to ``growth``) whose output ``x`` is gated, and concatenated to
its input:

* forget gate: a softmax spatial attention pools ``x`` to a context vector, 1x1 (reduce by 2) - BN1d -
  tanh - 1x1 - sigmoid gives per-channel weights for ``x``;
* update gate: depthwise 3x3 and dilated (2) depthwise 3x3 BN-ReLU-conv branches, each pooled by its
  own softmax spatial attention; 1x1 (reduce by 2) - BN1d - tanh, then one 1x1 per branch and a softmax
  over the two branches mix the two pooled vectors;
* output: ``forget * x + update`` (the update is a per-channel vector added at every position).

A transition compresses by ``theta = 0.5``: BN-ReLU-1x1 to ``c - (c - c/2)//2``, BN-ReLU-3x3/2 to ``c/2``,
then the same two gates (reductions 4) without the concatenation. Initialisation: PyTorch's defaults,
as the authors' code. A1: growth (12, 24, 36); A2: growth (24, 36, 64).

Stages: ``stage1`` = block 1 + transition 1, ``stage2`` = block 2 + transition 2, ``stage3`` = block 3 +
final BN-ReLU. MCL's branched HCGNet (``HCGNet_b``) shares the stem and ``stage1``: set the method's
split point to ``stage1`` to reproduce it (the default split shares ``stage2`` as well).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .base import MODELS, StagedNet


def _bn_relu_conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    """The authors' ``BasicConv``: pre-activation BN-ReLU-conv (no bias)."""
    return nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(cin), relu=nn.ReLU(inplace=True),
                                     conv=nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups,
                                                    bias=False)))


def _attend_pool(x: Tensor, context: nn.Conv2d) -> Tensor:
    """Sum of ``x`` over positions weighted by a softmax of a 1-channel 1x1 conv: (B, C, H, W) -> (B, C, 1, 1)."""
    w = context(x).flatten(1).softmax(1)  # (B, H*W)
    return torch.einsum("bchw,bhw->bc", x, w.view_as(x[:, 0]))[..., None, None]


class Gates(nn.Module):
    """HCGNet's forget gate (channel re-weighting of ``x``) and update gate (a global vector from two
    depthwise branches), applied as ``forget(x) * x + update(x)``."""

    def __init__(self, c: int, forget_factor: int, reduction_factor: int) -> None:
        super().__init__()
        self.conv_3x3 = _bn_relu_conv(c, c, 3, groups=c)
        self.conv_5x5 = _bn_relu_conv(c, c, 3, groups=c, dilation=2)
        self.global_context3x3 = nn.Conv2d(c, 1, 1)
        self.global_context5x5 = nn.Conv2d(c, 1, 1)
        r = 2 * c // reduction_factor
        self.fcall = nn.Conv2d(2 * c, r, 1)
        self.bn_attention = nn.BatchNorm1d(r)
        self.fc3x3 = nn.Conv2d(r, c, 1)
        self.fc5x5 = nn.Conv2d(r, c, 1)
        self.global_forget_context = nn.Conv2d(c, 1, 1)
        self.fc1 = nn.Conv2d(c, c // forget_factor, 1)
        self.bn_forget = nn.BatchNorm1d(c // forget_factor)
        self.fc2 = nn.Conv2d(c // forget_factor, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        context = _attend_pool(x, self.global_forget_context)
        forget = self.fc2(self.bn_forget(self.fc1(context).flatten(1)).tanh()[..., None, None]).sigmoid()
        p3 = _attend_pool(self.conv_3x3(x), self.global_context3x3)  # (B, C, 1, 1)
        p5 = _attend_pool(self.conv_5x5(x), self.global_context5x5)
        att = self.bn_attention(self.fcall(torch.cat([p3, p5], 1)).flatten(1)).tanh()[..., None, None]
        mix = torch.stack([self.fc3x3(att), self.fc5x5(att)], 1).softmax(1)  # (B, 2, C, 1, 1)
        return x * forget + mix[:, 0] * p3 + mix[:, 1] * p5


class SMG(nn.Module):
    """Dense bottleneck (BN-ReLU-1x1, BN-ReLU-grouped 3x3) whose gated output is concatenated to the input."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.conv1_1x1 = _bn_relu_conv(cin, bn_size * growth, 1)
        self.conv2_3x3 = _bn_relu_conv(bn_size * growth, growth, 3, groups=4)
        self.gates = Gates(growth, forget_factor=2, reduction_factor=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.gates(self.conv2_3x3(self.conv1_1x1(x)))], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 (halfway compression), BN-ReLU-3x3 stride 2 to ``cout``, then the gates (reductions 4)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin - (cin - cout) // 2
        self.conv1_1x1 = _bn_relu_conv(cin, mid, 1)
        self.conv2_3x3 = _bn_relu_conv(mid, cout, 3, stride=2)
        self.gates = Gates(cout, forget_factor=4, reduction_factor=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.gates(self.conv2_3x3(self.conv1_1x1(x)))


def hcgnet(growth: tuple[int, int, int], num_classes: int = 100, in_channels: int = 3,
           layers: int = 8, theta: float = 0.5) -> StagedNet:
    """Build a CIFAR HCGNet.

    Args:
        growth: growth rate of each hybrid block.
        num_classes: number of output classes.
        in_channels: image channels.
        layers: SMG modules per hybrid block.
        theta: compression of the transitions.

    Returns:
        The network, with stages ``stage1..stage3``; ``stage3`` ends with the final BN-ReLU.
    """
    c = 2 * growth[0]
    stages: list[tuple[str, nn.Module]] = []
    for i, g in enumerate(growth):
        mods: OrderedDict[str, nn.Module] = OrderedDict()
        mods[f"block{i + 1}"] = nn.Sequential(*(SMG(c + g * j, g) for j in range(layers)))
        c += g * layers
        if i < len(growth) - 1:
            mods[f"transition{i + 1}"] = Transition(c, int(c * theta))
            c = int(c * theta)
        else:
            mods["norm5"], mods["relu"] = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        stages.append((f"stage{i + 1}", nn.Sequential(mods)))
    return StagedNet(nn.Conv2d(in_channels, 2 * growth[0], 3, 1, 1, bias=False), stages, c, num_classes)


@MODELS.register("hcgnet_a1")
def hcgnet_a1(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """HCGNet-A1 (growth 12/24/36, 8 SMG modules per block; 1.1M parameters at 100 classes).

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 414).
    """
    return hcgnet((12, 24, 36), num_classes, in_channels)


@MODELS.register("hcgnet_a2")
def hcgnet_a2(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """HCGNet-A2 (growth 24/36/64, 8 SMG modules per block; 3.1M parameters at 100 classes).

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 716).
    """
    return hcgnet((24, 36, 64), num_classes, in_channels)
