"""ImageNet ResNets as torchvision defines them (``torchvision/models/resnet.py``).

A 7x7/2 conv-BN-ReLU and a 3x3/2 max-pool (the stem), then four stages of basic blocks (ResNet-18/34)
or bottlenecks (ResNet-50) with 64/128/256/512 planes, the last three striding by 2, so a 224x224 image
ends at 7x7. ResNet-50 is torchvision's "v1.5": the stride of a down-sampling bottleneck sits on its 3x3
conv, not on the first 1x1 as in the paper. Inside the blocks the modules carry torchvision's names
(``conv1``, ``bn1``, ..., ``downsample``), so its state_dicts and timm's (the same names) load by a
prefix rename (:mod:`peerdistill.models.pretrained`).

Initialisation is torchvision's: He-normal (fan-out) convolutions, unit BN, PyTorch's default for the
classifier, and ``zero_init_residual=False`` by default (True zeroes the last BN of every block, the
"zero-gamma" trick of Goyal et al. 2017 that torchvision offers and leaves off).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .base import MODELS, StagedNet
from .pretrained import rename_rules, register_weight_names


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlockTV(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (torchvision's ``BasicBlock``)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class BottleneckTV(nn.Module):
    """1x1-3x3(stride)-1x1 (4 x planes) with BN and ReLU, plus shortcut (torchvision's v1.5 ``Bottleneck``)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


def resnet_imagenet(block: type[BasicBlockTV] | type[BottleneckTV], counts: tuple[int, ...],
                    num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> StagedNet:
    """Build an ImageNet ResNet with torchvision's layout and initialisation.

    Args:
        block: basic block (ResNet-18/34) or bottleneck (ResNet-50 and deeper).
        counts: blocks per stage.
        num_classes: number of output classes.
        in_channels: image channels.
        zero_init_residual: start every block's last BN at gamma = 0 (each block starts as the identity).

    Returns:
        The network: stem (conv1, bn1, relu, maxpool), stages ``stage1..stage4`` (torchvision's
        ``layer1..layer4``), embedding width ``512 * block.expansion``.
    """
    stem = nn.Sequential(OrderedDict(conv1=nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), bn1=nn.BatchNorm2d(64),
                                     relu=nn.ReLU(inplace=True), maxpool=nn.MaxPool2d(3, 2, 1)))
    cin, stages = 64, []
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
            cin = planes * block.expansion
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    net = StagedNet(stem, stages, cin, num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in net.modules():
            if isinstance(m, (BasicBlockTV, BottleneckTV)):
                nn.init.zeros_(m.last_bn().weight)
    return net


# torchvision's and timm's ResNet state_dicts use the same names: conv1/bn1/layerN.M.*/fc.
_TV_NAMES = rename_rules((r"conv1\.", "stem.conv1."), (r"bn1\.", "stem.bn1."),
                         (r"layer([1-4])\.", lambda m: f"stages.{int(m[1]) - 1}."), (r"fc\.", "classifier."))


def _register(depth: int, block: type[BasicBlockTV] | type[BottleneckTV], counts: tuple[int, ...]) -> None:
    name = f"resnet{depth}_imagenet"

    def factory(num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> StagedNet:
        return resnet_imagenet(block, counts, num_classes, in_channels, zero_init_residual)

    kind = "basic blocks" if block is BasicBlockTV else "bottlenecks, stride on the 3x3 (v1.5)"
    factory.__doc__ = (f"ImageNet ResNet-{depth} as torchvision's ``resnet{depth}``: 7x7/2 stem + max-pool, "
                       f"{kind} {list(counts)}; loads torchvision / timm weights (``pretrained=PATH``).")
    MODELS.register(name)(factory)
    register_weight_names(name, {"torchvision / timm": _TV_NAMES})


_register(18, BasicBlockTV, (2, 2, 2, 2))
_register(34, BasicBlockTV, (3, 4, 6, 3))
_register(50, BottleneckTV, (3, 4, 6, 3))
