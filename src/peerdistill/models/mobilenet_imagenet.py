"""ImageNet MobileNets.

* ``mobilenetv2_imagenet``: torchvision's ``mobilenet_v2`` (width 1.0): a 3x3/2 conv-BN-ReLU6 stem to 32
  channels, 17 inverted residuals (the first without an expansion conv), a 1x1 conv to 1280, and
  ``Dropout(0.2)`` before the classifier (kept here inside the classifier, see :class:`DropoutLinear`).
  Modules carry torchvision's names inside each ``features`` item; timm's ``mobilenetv2_100`` (same
  network, its own names) is mapped too. Initialisation as torchvision: He-normal fan-out convolutions,
  unit BN, classifier N(0, 0.01).
* ``mobilenetv1_imagenet``: the MobileNetV1 of DKD / mdistiller (``mdistiller/models/imagenet/
  mobilenetv1.py``), the student of the ResNet-50 -> MobileNetV1 ImageNet row: a 3x3/2 conv-BN-ReLU to
  32 channels, then 13 depthwise-separable blocks (dw3x3-BN-ReLU, 1x1-BN-ReLU) to 1024 channels, ReLU
  (not ReLU6), PyTorch's default initialisation as in that code. Its weights load under mdistiller's
  names (``model.N.M``); timm's ``mobilenetv1_100`` is another network (ReLU6) and is not mapped.

Stages follow the resolutions (strides 4, 8, 16, 32), where timm and mdistiller take their feature
taps; whatever runs before pooling (MobileNetV2's final 1x1 conv) closes the last stage.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..params import Fraction
from .base import MODELS, StagedNet
from .pretrained import chain, register_weight_names, rename_rules, sequence_position
from .resnet import conv_bn


class DropoutLinear(nn.Linear):
    """A linear classifier applying dropout to its input in training: torchvision's
    ``Sequential(Dropout(p), Linear)`` as one ``nn.Linear``, so the pooled embedding stays dropout-free."""

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.dropout(x, self.p, self.training))


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    """Conv (no bias) - BN - activation: torchvision's ``Conv2dNormActivation``."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act(inplace=True))


class InvertedResidualTV(nn.Module):
    """torchvision's MobileNetV2 block: [1x1 expand-BN-ReLU6] - dw3x3-BN-ReLU6 - 1x1-BN, residual when the
    shape is kept; no expansion conv when ``expand == 1``."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [conv_bn_act(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, first stride s): MobileNetV2's Table 2, as torchvision.
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))
# First ``features`` index of stage1..stage4 (strides 4, 8, 16, 32); items 0-1 form the stem.
V2_STARTS = (2, 4, 7, 14)


def _staged(features: list[nn.Module], starts: tuple[int, ...]) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """Cut a flat feature list into the stem and stages ``stage1..`` at ``starts``."""
    bounds = (*starts, len(features))
    stages = [(f"stage{s + 1}", nn.Sequential(*features[bounds[s]:bounds[s + 1]])) for s in range(len(starts))]
    return nn.Sequential(*features[:starts[0]]), stages


@MODELS.register("mobilenetv2_imagenet")
def mobilenetv2_imagenet(num_classes: int = 1000, in_channels: int = 3, dropout: Fraction = 0.2) -> StagedNet:
    """ImageNet MobileNetV2 1.0x as torchvision's ``mobilenet_v2`` (3.50M parameters at 1000 classes);
    loads torchvision / timm ``mobilenetv2_100`` weights.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        dropout: dropout rate on the pooled features before the classifier (torchvision: 0.2).

    Returns:
        The network, with stages ``stage1..stage4``; ``stage4`` ends with the 1x1 conv to 1280 channels.
    """
    cin, features = 32, [conv_bn_act(in_channels, 32, 3, 2)]
    for t, c, n, s in V2_SETTING:
        for j in range(n):
            features.append(InvertedResidualTV(cin, c, s if j == 0 else 1, t))
            cin = c
    features.append(conv_bn_act(cin, 1280, 1))
    net = StagedNet(*_staged(features, V2_STARTS), 1280, num_classes)
    net.classifier = DropoutLinear(1280, num_classes, dropout)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return net


def _features_rule(starts: tuple[int, ...], prefix: str = "features") -> tuple[str, Callable[[re.Match[str]], str]]:
    """``{prefix}.N.`` (a flat Sequential's item N) -> where item N lives in the staged network."""
    return rf"{prefix}\.(\d+)\.", lambda m: sequence_position(int(m[1]), starts) + "."


_V2_TV = rename_rules(_features_rule(V2_STARTS), (r"classifier\.1\.", "classifier."))
# timm's mobilenetv2_100: blocks.i.j are torchvision's features[1 + sum(repeats[:i]) + j]; the first block
# is a depthwise-separable conv (dw, pw-linear), the others inverted residuals (pw, dw, pw-linear).
_TIMM_DS = {"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1", "bn2": "2"}
_TIMM_IR = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "conv_pwl": "2", "bn3": "3"}


def _timm_block(m: re.Match[str]) -> str:
    i, j, part = int(m[1]), int(m[2]), m[3]
    index = 1 + sum(n for _, _, n, _ in V2_SETTING[:i]) + j
    return f"features.{index}.conv.{(_TIMM_DS if i == 0 else _TIMM_IR).get(part, part)}."


_V2_TIMM = chain(rename_rules((r"conv_stem\.", "features.0.0."), (r"bn1\.", "features.0.1."),
                              (r"blocks\.(\d+)\.(\d+)\.(\w+)\.", _timm_block), (r"conv_head\.", "features.18.0."),
                              (r"bn2\.", "features.18.1."), (r"classifier\.", "classifier.1.")), _V2_TV)
register_weight_names("mobilenetv2_imagenet", {"torchvision": _V2_TV, "timm": _V2_TIMM})


# (output channels, stride) of MobileNetV1's 13 depthwise-separable blocks.
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
             (512, 1), (1024, 2), (1024, 1))
# First item (of the reference code's ``model`` Sequential) of stage1..stage4; items 0-1 form the stem.
V1_STARTS = (2, 4, 6, 12)


def _dw_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """dw3x3-BN-ReLU then 1x1-BN-ReLU, as one flat Sequential (the reference code's ``conv_dw``)."""
    return nn.Sequential(*conv_bn_act(cin, cin, 3, stride, cin, nn.ReLU), *conv_bn(cin, cout, 1))


@MODELS.register("mobilenetv1_imagenet")
def mobilenetv1_imagenet(num_classes: int = 1000, in_channels: int = 3) -> StagedNet:
    """ImageNet MobileNetV1 1.0x of DKD / mdistiller (4.23M parameters at 1000 classes), ReLU; loads
    weights saved by that code.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.

    Returns:
        The network, with stages ``stage1..stage4`` (embedding width 1024).
    """
    features: list[nn.Module] = [conv_bn_act(in_channels, 32, 3, 2, act=nn.ReLU)]
    cin = 32
    for cout, stride in V1_BLOCKS:
        features.append(_dw_separable(cin, cout, stride))
        cin = cout
    return StagedNet(*_staged(features, V1_STARTS), 1024, num_classes)  # PyTorch's default init, as the code


register_weight_names("mobilenetv1_imagenet", {
    "mdistiller": rename_rules(_features_rule(V1_STARTS, "model"), (r"fc\.", "classifier."))})
