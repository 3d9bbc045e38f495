"""The model contract every network in the zoo satisfies (DESIGN §3).

A :class:`StagedNet` is ``stem -> stages[0] -> ... -> stages[-1] -> global average pool -> classifier``.
Models know nothing about distillation; the engine asks for what a method needs:

* ``forward_features(x)`` -> ordered ``{stage_name: feature map}`` (the last map is the one pooled);
* ``forward_head(fmap, pre_logits=False)`` -> logits, or the pooled embedding when ``pre_logits``;
* ``num_features`` (embedding width), ``stage_names``, ``classifier`` (the ``nn.Linear`` head);
* ``forward(x)`` -> logits, so every model stays an ordinary ``nn.Module``.

Anything applied after the last block and before pooling (a final BN-ReLU, MobileNetV2's 1x1 conv)
belongs to the last stage, so ``stages[k:]`` plus the head is always a valid "branch" of a shared-trunk cohort
(:func:`peerdistill.models.cohort.build_cohort`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import PeerdistillError
from ..params import check_value
from ..registry import Registry

MODELS: Registry[StagedNet] = Registry("model")


@dataclass
class PeerOutput:
    """One network's outputs for one input: logits (B, K), pooled embedding (B, D), requested stage maps."""

    logits: Tensor
    embedding: Tensor
    maps: dict[str, Tensor] = field(default_factory=dict)


class StagedNet(nn.Module):
    """A classifier made of a stem, named stages and a linear head.

    ``splittable``: its stem and stages are separate modules that a branched cohort may share between peers
    and methods may copy (``False`` for :class:`~peerdistill.models.adapt.Adapted` models).

    Args:
        stem: module applied to the input.
        stages: ``(name, module)`` pairs applied in order.
        num_features: channels of the last stage's output (= embedding width).
        num_classes: number of output classes.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[tuple[str, nn.Module]],
                 num_features: int, num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.stage_names: tuple[str, ...] = tuple(name for name, _ in stages)
        self.stages = nn.ModuleList(module for _, module in stages)
        self.num_features = num_features
        self.num_classes = num_classes
        self.classifier = nn.Linear(num_features, num_classes)

    splittable = True

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Return every stage's output map, in order. The last one is pooled by the head."""
        x = self.stem(x)
        maps: dict[str, Tensor] = {}
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            maps[name] = x
        return maps

    def pool(self, fmap: Tensor) -> Tensor:
        """Global average pooling: (B, C, H, W) -> (B, C)."""
        return fmap.mean((2, 3))

    def forward_head(self, fmap: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the last stage map and classify it (or return the pooled embedding)."""
        emb = self.pool(fmap)
        return emb if pre_logits else self.classifier(emb)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)[self.stage_names[-1]])


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit BN, zero biases: the CIFAR convention of the reference codes."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build_model(name: str, num_classes: int, in_channels: int, pretrained: str | None = None,
                **kwargs: object) -> StagedNet:
    """Build a registered model; every constructor takes ``num_classes`` and ``in_channels``.

    Args:
        name: registry name.
        num_classes: number of output classes.
        in_channels: image channels.
        pretrained: a weights file to start from (any model; see :mod:`peerdistill.models.pretrained`
            for the formats and names read, and what happens to a classifier of another size).
        **kwargs: the model's own parameters.

    Raises:
        PeerdistillError: if what the constructor returns is not a :class:`StagedNet` (the engine reads its
            stem, stages and classifier), before any run directory exists.
    """
    net = MODELS.build(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if isinstance(net, nn.Module) and not isinstance(net, StagedNet) and all(
            callable(getattr(net, f, None)) for f in ("forward_features", "forward_head")):
        from .adapt import adapt  # timm's convention: the adapter reads it as a StagedNet

        net = adapt(net)
    if not isinstance(net, StagedNet):
        raise PeerdistillError(f"model {name!r} builds a {type(net).__name__}, not a StagedNet: a model must be a "
                               f"peerdistill.StagedNet (a stem, named stages and a linear classifier), have timm's "
                               f"forward_features/forward_head, or be returned as peerdistill.adapt(model, "
                               f"layers=[...]) so that methods can tap its stages, embedding and head")
    if pretrained:
        from .pretrained import load_pretrained

        load_pretrained(net, name, pretrained)
    return net


def check_model_args(name: str, args: dict[str, Any]) -> None:
    """Validate a model's config arguments without building it: its constructor's parameters, and
    ``pretrained`` (a path to an existing file), which every model accepts."""
    rest = dict(args)
    path = rest.pop("pretrained", None)
    check_value(path, str | None, f"parameter 'pretrained' of model {name!r}")
    if path and not Path(path).expanduser().is_file():
        raise PeerdistillError(f"weights file {path} (model.pretrained) does not exist")
    MODELS.check(name, rest, skip=("num_classes", "in_channels"))
