"""The CIFAR variant of the ImageNet ResNet-18/34 (He et al. 2016, Table 1).

This is the network called "ResNet-18" in CS-KD (Yun et al. 2020), SD-Dropout and most CIFAR
self-distillation papers (after kuangliu/pytorch-cifar): the 7x7/2 stem conv and the 3x3/2 max-pool
are replaced by a 3x3/1 conv-BN-ReLU with 64 channels, followed by four stages of basic blocks with
64/128/256/512 channels (the last three stride by 2), so a 32x32 image ends at 4x4.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import MODELS, StagedNet, init_weights
from .resnet import BasicBlock, conv_bn


def cifar_resnet_4stage(blocks_per_stage: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                        widths: Sequence[int] = (64, 128, 256, 512)) -> StagedNet:
    """Build a four-stage basic-block ResNet with a CIFAR (3x3, stride 1, no max-pool) stem.

    Args:
        blocks_per_stage: number of basic blocks in each stage.
        num_classes: number of output classes.
        in_channels: image channels.
        widths: channels of each stage.

    Returns:
        The network, with stages ``stage1..stage4`` (embedding width ``widths[-1]``).
    """
    cin = widths[0]
    stages: list[tuple[str, nn.Module]] = []
    for i, (w, n) in enumerate(zip(widths, blocks_per_stage)):
        blocks: list[nn.Module] = []
        for j in range(n):
            blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
        stages.append((f"stage{i + 1}", nn.Sequential(*blocks)))
    net = StagedNet(conv_bn(in_channels, widths[0], 3), stages, cin, num_classes)
    init_weights(net)
    return net


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """CIFAR ResNet-18: basic blocks [2, 2, 2, 2], widths 64/128/256/512, 3x3 stride-1 stem.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 512).
    """
    return cifar_resnet_4stage((2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """CIFAR ResNet-34: basic blocks [3, 4, 6, 3], widths 64/128/256/512, 3x3 stride-1 stem.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 512).
    """
    return cifar_resnet_4stage((3, 4, 6, 3), num_classes, in_channels)
