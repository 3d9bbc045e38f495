"""CIFAR-style ResNets (He et al. 2016, §4.2): 3 stages of 16/32/64 channels, depth = 6n + 2 (basic)
or 9n + 2 (bottleneck, as ResNet-110 in MCL/PCL), and the wide "x4" variants of CRD (32/64/128 x 4)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import MODELS, StagedNet, init_weights


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, planes, 3, stride), conv_bn(planes, planes, 3, relu=False))
        self.short = (nn.Identity() if stride == 1 and cin == planes
                      else conv_bn(cin, planes, 1, stride, relu=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck 1x1 - 3x3 - 1x1 (4 * planes); ``width`` widens the middle (WRN-20-8)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int | None = None) -> None:
        super().__init__()
        cout, width = planes * self.expansion, width or planes
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, cout, 1, relu=False))
        self.short = (nn.Identity() if stride == 1 and cin == cout
                      else conv_bn(cin, cout, 1, stride, relu=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.short(x))


def residual_net(block: type[BasicBlock] | type[Bottleneck], counts: Sequence[int], widths: Sequence[int],
                 num_classes: int, in_channels: int, stem: int | None = None) -> StagedNet:
    """A 3x3 stride-1 conv-BN-ReLU stem, then one stage of ``counts[i]`` blocks of width ``widths[i]`` per
    entry (every stage but the first strides by 2): the CIFAR layout of every ResNet in the zoo."""
    cin = stem or widths[0]
    stages = []
    for i, (w, n) in enumerate(zip(widths, counts)):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w * block.expansion
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    net = StagedNet(conv_bn(in_channels, stem or widths[0], 3), stages, cin, num_classes)
    init_weights(net)
    return net


def cifar_resnet(depth: int, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64),
                 bottleneck: bool = False, stem: int | None = None) -> StagedNet:
    """Build a 3-stage CIFAR ResNet of the given depth (stem width defaults to ``widths[0]``)."""
    block = Bottleneck if bottleneck else BasicBlock
    per = 9 if bottleneck else 6
    if (depth - 2) % per:
        raise ValueError(f"depth {depth} is not {per}n+2")
    n = (depth - 2) // per
    return residual_net(block, [n] * len(widths), widths, num_classes, in_channels, stem)


def _register(name: str, depth: int, widths: tuple[int, ...] = (16, 32, 64), bottleneck: bool = False,
              stem: int | None = None) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
        return cifar_resnet(depth, num_classes, in_channels, widths, bottleneck, stem)

    factory.__doc__ = f"CIFAR ResNet-{depth}{' (bottleneck)' if bottleneck else ''}, widths {widths}."
    MODELS.register(name)(factory)


for _d in (8, 14, 20, 32, 44, 56):
    _register(f"resnet{_d}", _d)
_register("resnet110", 110, bottleneck=True)  # bottleneck 12-12-12, as in MCL / L-MCL / PCL
# CRD's x4 variants: a 32-channel stem, then 64/128/256 (RepDistiller models/resnet.py).
_register("resnet8x4", 8, (64, 128, 256), stem=32)
_register("resnet32x4", 32, (64, 128, 256), stem=32)
