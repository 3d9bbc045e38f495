"""The CIFAR variant of the ImageNet ResNet-18/34 (He et al. 2016, Table 1).

This is the network called "ResNet-18" in CS-KD (Yun et al. 2020), SD-Dropout and most CIFAR
self-distillation papers (after kuangliu/pytorch-cifar): the 7x7/2 stem conv and the 3x3/2 max-pool
are replaced by a 3x3/1 conv-BN-ReLU with 64 channels, followed by four stages of basic blocks with
64/128/256/512 channels (the last three stride by 2), so a 32x32 image ends at 4x4.
"""
from __future__ import annotations

from .base import MODELS, StagedNet
from .resnet import BasicBlock, residual_net


def _register(depth: int, counts: tuple[int, ...]) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
        return residual_net(BasicBlock, counts, (64, 128, 256, 512), num_classes, in_channels)

    factory.__doc__ = (f"CIFAR ResNet-{depth}: basic blocks {list(counts)}, widths 64/128/256/512, "
                       "3x3 stride-1 stem (embedding width 512).")
    MODELS.register(f"resnet{depth}")(factory)


_register(18, (2, 2, 2, 2))
_register(34, (3, 4, 6, 3))
