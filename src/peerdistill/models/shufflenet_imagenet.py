"""ImageNet ShuffleNetV2 (Ma et al. 2018) as torchvision's ``shufflenet_v2_x{0_5,1_0,1_5,2_0}``.

A 3x3/2 conv-BN-ReLU (24 channels) and a 3x3/2 max-pool, three stages of 4/8/4 units (the first of each
down-samples with two branches; the others split the channels in half and transform one), a 1x1
conv-BN-ReLU ("conv5") that closes the last stage, global pooling and the classifier. ``width`` selects
the stage widths of the paper's Table 5. The units carry torchvision's names (``branch1``/``branch2``),
so its state_dicts load by a prefix rename (timm has no ShuffleNetV2). Initialisation: PyTorch's
defaults, as torchvision (its ShuffleNetV2 has no initialisation code).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn

from .base import MODELS, StagedNet
from .pretrained import register_weight_names, rename_rules
from .shufflenet import channel_shuffle

# Stage output channels and conv5 width per width multiplier (torchvision's ``stages_out_channels``).
WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024), 2.0: (244, 488, 976, 2048),
}
UNITS = (4, 8, 4)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class ShuffleUnitTV(nn.Module):
    """torchvision's ShuffleNetV2 ``InvertedResidual``: stride 1 keeps half the channels and transforms the
    other half (1x1-dw3x3-1x1); stride 2 transforms the whole input in two branches; then a 2-group shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        self.branch1 = (nn.Sequential(*_conv_bn(cin, cin, 3, stride, cin, relu=False), *_conv_bn(cin, half, 1))
                        if stride > 1 else nn.Sequential())
        first = cin if stride > 1 else half
        self.branch2 = nn.Sequential(*_conv_bn(first, half, 1), *_conv_bn(half, half, 3, stride, half, relu=False),
                                     *_conv_bn(half, half, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            keep, rest = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(rest)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


@MODELS.register("shufflenetv2_imagenet")
def shufflenetv2_imagenet(num_classes: int = 1000, in_channels: int = 3,
                          width: Literal[0.5, 1.0, 1.5, 2.0] = 1.0) -> StagedNet:
    """ImageNet ShuffleNetV2 as torchvision's ``shufflenet_v2_x*`` (1.0x: 2.28M parameters at 1000
    classes); ``width`` 0.5 / 1.0 / 1.5 / 2.0; loads torchvision weights of the same width.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        width: channel multiplier (Table 5 of the paper).

    Returns:
        The network: stem (conv1, maxpool), stages ``stage1..stage3`` (torchvision's ``stage2..stage4``),
        the last closed by ``conv5``.
    """
    *widths, last = WIDTHS[float(width)]
    stem = nn.Sequential(OrderedDict(conv1=nn.Sequential(*_conv_bn(in_channels, 24, 3, 2)),
                                     maxpool=nn.MaxPool2d(3, 2, 1)))
    cin, stages = 24, []
    for i, (w, n) in enumerate(zip(widths, UNITS)):
        units: OrderedDict[str, nn.Module] = OrderedDict(
            (str(j), ShuffleUnitTV(cin if j == 0 else w, w, 2 if j == 0 else 1)) for j in range(n))
        cin = w
        if i == len(UNITS) - 1:
            units["conv5"] = nn.Sequential(*_conv_bn(cin, last, 1))
        stages.append((f"stage{i + 1}", nn.Sequential(units)))
    return StagedNet(stem, stages, last, num_classes)


register_weight_names("shufflenetv2_imagenet", {"torchvision": rename_rules(
    (r"conv1\.", "stem.conv1."), (r"stage([2-4])\.", lambda m: f"stages.{int(m[1]) - 2}."),
    (r"conv5\.", "stages.2.conv5."), (r"fc\.", "classifier."))})
