"""CIFAR ShuffleNets as defined in CRD/RepDistiller (``ShuffleNetv1.py``, ``ShuffleNetv2.py``).

Both keep the full 32x32 resolution in a 1x1 conv-BN-ReLU stem with 24 channels (no stride, no
max-pool), then three stride-2 stages, so a 32x32 image ends at 4x4.

* ``shufflenetv1``: ShuffleNet (Zhang et al. 2018), groups 3, stage widths 240/480/960 with
  4/8/4 units. As in CRD's code, the depthwise conv is followed by BN *and* ReLU, and the first
  unit's 1x1 conv (on the 24-channel stem) is not grouped.
* ``shufflenetv2``: ShuffleNetV2 1.0x (Ma et al. 2018), widths 116/232/464, 4/8/4 units (one
  down-sampling unit then 3/7/3 basic units), and a final 1x1 conv to 1024 channels that closes
  ``stage3``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MODELS, StagedNet, init_weights
from .resnet import conv_bn


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(B, g*c, H, W) -> (B, c*g, H, W): interleave the channels of the ``groups`` groups."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def dw_bn(c: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 conv + BN (no activation)."""
    return nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c))


# --------------------------------------------------------------------------- ShuffleNet V1


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout - cin if stride == 2 else cout  # stride 2: the shortcut supplies ``cin`` channels
        mid = branch // 4
        self.g1 = first_groups
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, groups=first_groups, bias=False),
                                   nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        # CRD (after kuangliu/pytorch-cifar) has a ReLU after the depthwise BN; the paper does not.
        self.conv2 = nn.Sequential(dw_bn(mid, stride), nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(mid, branch, 1, groups=groups, bias=False), nn.BatchNorm2d(branch))
        self.short = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.g1)))
        res = self.short(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(out)


def shufflenet_v1(num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (240, 480, 960),
                  units: tuple[int, ...] = (4, 8, 4), groups: int = 3) -> StagedNet:
    """Build CRD's CIFAR ShuffleNet V1.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        widths: output channels of the three stages.
        units: number of shuffle units per stage (the first one strides by 2).
        groups: groups of the 1x1 convolutions.

    Returns:
        The network, with stages ``stage1..stage3`` (embedding width ``widths[-1]``).
    """
    cin = 24
    stages: list[tuple[str, nn.Module]] = []
    for i, (w, n) in enumerate(zip(widths, units)):
        blocks: list[nn.Module] = []
        for j in range(n):
            # CRD: the very first 1x1 conv (input = the 24-channel stem) is not grouped.
            first_groups = 1 if (i == 0 and j == 0) else groups
            blocks.append(ShuffleUnitV1(cin, w, 2 if j == 0 else 1, groups, first_groups))
            cin = w
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    net = StagedNet(conv_bn(in_channels, 24, 1), stages, cin, num_classes)
    init_weights(net)  # CRD leaves PyTorch's default init; we use the zoo's He fan-out convention
    return net


@MODELS.register("shufflenetv1")
def shufflenetv1(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """CRD's ``ShuffleV1``: groups 3, widths 240/480/960, 4/8/4 units, CIFAR 1x1 stem.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 960).
    """
    return shufflenet_v1(num_classes, in_channels)


# --------------------------------------------------------------------------- ShuffleNet V2


class BasicUnitV2(nn.Module):
    """Split channels in half; transform one half (1x1-dw3x3-1x1), concatenate, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.half = c // 2  # CRD: int(C * 0.5) channels pass through untouched
        h = c - self.half
        self.branch = nn.Sequential(conv_bn(h, h, 1), dw_bn(h), conv_bn(h, h, 1))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, :self.half], x[:, self.half:]
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class DownUnitV2(nn.Module):
    """Stride-2 unit: both branches see the whole input and each gives ``cout / 2`` channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(dw_bn(cin, 2), conv_bn(cin, mid, 1))
        self.right = nn.Sequential(conv_bn(cin, mid, 1), dw_bn(mid, 2), conv_bn(mid, mid, 1))

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


def shufflenet_v2(num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (116, 232, 464),
                  units: tuple[int, ...] = (3, 7, 3), last: int = 1024) -> StagedNet:
    """Build CRD's CIFAR ShuffleNet V2.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        widths: output channels of the three stages.
        units: basic units per stage, each stage starting with one extra down-sampling unit.
        last: channels of the final 1x1 conv ("conv5"), which closes the last stage.

    Returns:
        The network, with stages ``stage1..stage3`` (embedding width ``last``).
    """
    cin = 24
    stages: list[tuple[str, nn.Module]] = []
    for i, (w, n) in enumerate(zip(widths, units)):
        blocks: list[nn.Module] = [DownUnitV2(cin, w)] + [BasicUnitV2(w) for _ in range(n)]
        cin = w
        if i == len(widths) - 1:
            blocks.append(conv_bn(cin, last, 1))
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    net = StagedNet(conv_bn(in_channels, 24, 1), stages, last, num_classes)
    init_weights(net)  # CRD leaves PyTorch's default init; we use the zoo's He fan-out convention
    return net


@MODELS.register("shufflenetv2")
def shufflenetv2(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """CRD's ``ShuffleV2``: ShuffleNetV2 1.0x (116/232/464, conv5 1024) with a CIFAR 1x1 stem.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 1024).
    """
    return shufflenet_v2(num_classes, in_channels)
