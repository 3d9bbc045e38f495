"""CIFAR VGGs with batch normalisation, as defined in CRD/RepDistiller ``models/vgg.py``.

The network has five conv groups (every conv is conv3x3(bias)-BN-ReLU) with 2x2 max-pooling between
the first four; there are no fully-connected layers besides the single linear classifier, and the
last map is globally average-pooled. CRD's ``vgg8`` .. ``vgg16`` names map to the ``*_bn`` variants.

Stage layout: ``stem`` = group 0; ``stageN`` = max-pool + group N (N = 1..4). CRD applies the fourth
max-pool (before group 4) only when the input is 64x64; :class:`LatePool` generalises that rule to
"pool when the map is at least 8 pixels", which reproduces it for 32x32 (map 4, no pool) and 64x64
(map 8, pooled to 4) inputs and keeps 28x28 inputs (map 3) valid.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import MODELS, StagedNet, init_weights

# Channels of the conv groups, per CRD's ``cfg`` ('S', 'A', 'B', 'D').
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class LatePool(nn.Module):
    """2x2 max-pool applied only to maps at least ``min_size`` pixels on their shorter side."""

    def __init__(self, min_size: int = 8) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) >= self.min_size:
            return F.max_pool2d(x, 2, 2)
        return x


def _group(cin: int, widths: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for w in widths:
        # CRD keeps the conv bias even though BN follows it.
        layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=True), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return layers


def vgg(cfg: tuple[tuple[int, ...], ...], num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """Build a CIFAR VGG-BN from its five conv groups.

    Args:
        cfg: output channels of each conv in each of the five groups.
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network, with stages ``stage1..stage4`` (embedding width ``cfg[-1][-1]``).
    """
    if len(cfg) != 5:
        raise ValueError("a CIFAR VGG has five conv groups")
    stem = nn.Sequential(*_group(in_channels, cfg[0]))
    stages: list[tuple[str, nn.Module]] = []
    for i in range(1, 5):
        pool: nn.Module = nn.MaxPool2d(2, 2) if i < 4 else LatePool(8)
        stages.append((f"stage{i}", nn.Sequential(pool, *_group(cfg[i - 1][-1], cfg[i]))))
    net = StagedNet(stem, stages, cfg[-1][-1], num_classes)
    init_weights(net)  # CRD: N(0, sqrt(2 / (k*k*out))) convs = He fan-out, zero conv bias, unit BN
    nn.init.normal_(net.classifier.weight, 0.0, 0.01)  # CRD's VGG initialises the classifier N(0, 0.01)
    return net


def _register(name: str) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
        return vgg(CONFIGS[name], num_classes, in_channels)

    factory.__doc__ = f"CIFAR {name.upper()} with BN (CRD's ``{name}_bn``), single linear classifier."
    MODELS.register(name)(factory)


for _name in CONFIGS:
    _register(_name)
