"""CIFAR MobileNetV2 as defined in CRD/RepDistiller ``models/mobilenetv2.py`` (``mobile_half``).

CRD's student "MobileNetV2" is MobileNetV2 with expansion ``T = 6`` and width multiplier 0.5 (the
"half" model of the KD tables), adapted to 32x32 inputs: the stem conv keeps stride 2 but the second
inverted-residual group uses stride 1 (instead of 2), so a 32x32 image ends at 2x2. The last 1x1 conv
stays at 1280 channels because CRD only scales it for width multipliers above 1.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import MODELS, StagedNet, init_weights
from .resnet import conv_bn

# (expansion t, channels c, repeats n, first stride s), CRD's CIFAR setting for T = 6.
SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
# Which groups of SETTING form each stage; the cut points are CRD's feature taps f1..f4.
STAGE_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1), (2,), (3, 4), (5, 6))


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when the shape is kept.

    As in CRD, the expansion conv is present even when ``expand == 1`` (torchvision drops it).
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            conv_bn(hidden, cout, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


def mobilenetv2_cifar(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5) -> StagedNet:
    """Build CRD's CIFAR MobileNetV2.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        width_mult: channel multiplier of the stem and the inverted residual groups (0.5 in CRD).

    Returns:
        The network, with stages ``stage1..stage4``; ``stage4`` ends with the 1x1 conv to
        ``1280`` (or ``1280 * width_mult`` when ``width_mult > 1``) channels.
    """
    cin = int(32 * width_mult)
    stem = conv_bn(in_channels, cin, 3, stride=2)
    groups: list[nn.Sequential] = []
    for t, c, n, s in SETTING:
        cout = int(c * width_mult)
        blocks: list[nn.Module] = []
        for j in range(n):
            blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
            cin = cout
        groups.append(nn.Sequential(*blocks))
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280
    stages: list[tuple[str, nn.Module]] = []
    for i, idx in enumerate(STAGE_GROUPS):
        mods: list[nn.Module] = [groups[k] for k in idx]
        if i == len(STAGE_GROUPS) - 1:
            mods.append(conv_bn(cin, last, 1))  # the final 1x1 conv belongs to the last stage
        stages.append((f"stage{i + 1}", nn.Sequential(*mods)))
    net = StagedNet(stem, stages, last, num_classes)
    init_weights(net)  # CRD: N(0, sqrt(2 / (k*k*out))) convs = He fan-out, unit BN
    nn.init.normal_(net.classifier.weight, 0.0, 0.01)  # CRD: classifier N(0, 0.01)
    return net


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> StagedNet:
    """CRD's CIFAR MobileNetV2 student: expansion 6, width multiplier 0.5 (``mobile_half``).

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network (embedding width 1280).
    """
    return mobilenetv2_cifar(num_classes, in_channels, 0.5)
