"""Every registered model satisfies the StagedNet contract (models/base.py) on small CPU batches."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peerdistill.models import MODELS, StagedNet, build_model

ALL = list(MODELS)
# (in_channels, image size, num_classes): Fashion-MNIST-like and CIFAR-100-like inputs.
SHAPES = [(1, 28, 10), (3, 32, 100)]
SHAPE_IDS = ["1x28x28-c10", "3x32x32-c100"]
BATCH = 2

# Published CIFAR-100 parameter counts, in millions (3% tolerance).
PUBLISHED_PARAMS_M = {
    "resnet32": 0.47,  # MCL-OKD / DML tables
    "resnet110": 1.17,  # bottleneck 12-12-12 of MCL / PCL (CRD's basic-block ResNet-110 has 1.7M)
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,  # CRD's 0.5x "mobile_half"
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
    "resnet18": 11.2,  # CS-KD's CIFAR ResNet-18 (11.22M)
    "densenet40_12": 0.19,  # MCL-OKD's DenseNet(-BC)-40-12 (0.188M)
}


def _make(name: str, cin: int, classes: int) -> StagedNet:
    torch.manual_seed(0)
    return build_model(name, num_classes=classes, in_channels=cin)


def _input(cin: int, size: int) -> torch.Tensor:
    return torch.randn(BATCH, cin, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_has_the_zoo() -> None:
    expected = {"resnet8", "resnet32", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2",
                "wrn_40_1", "wrn_40_2", "wrn_28_4", "wrn_20_8", "vgg8", "vgg11", "vgg13", "vgg16",
                "mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet18", "resnet34", "densenet40_12"}
    assert expected <= set(ALL)
    for name in ALL:
        assert MODELS.params(name) == {"num_classes": 10, "in_channels": 3}, name


@pytest.mark.parametrize(("cin", "size", "classes"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", ALL)
def test_contract(name: str, cin: int, size: int, classes: int) -> None:
    model = _make(name, cin, classes).eval()
    x = _input(cin, size)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (model.num_features, classes)
    assert model.stage_names == tuple(f"stage{i + 1}" for i in range(len(model.stage_names)))
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_features(x)
        assert list(maps) == list(model.stage_names)
        last = maps[model.stage_names[-1]]
        assert last.shape[:2] == (BATCH, model.num_features)
        emb = model.forward_head(last, pre_logits=True)
        head = model.forward_head(last)
    assert logits.shape == (BATCH, classes)
    assert emb.shape == (BATCH, model.num_features)
    torch.testing.assert_close(head, logits)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("cin", "size", "classes"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name: str, cin: int, size: int, classes: int) -> None:
    model = _make(name, cin, classes).train()
    loss = nn.functional.cross_entropy(model(_input(cin, size)), torch.arange(BATCH) % classes)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", ALL)
def test_channels_last(name: str) -> None:
    # float64: the two memory formats compute the same function, which float64 shows to its precision on any
    # CPU (in float32 their kernels round differently, by an amount that grows with the depth of the net).
    # 16 x 16 RGB keeps float64's slower convolutions cheap.
    model = _make(name, 3, 10).eval().double()
    x = _input(3, 16).double()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("name", ALL)
def test_64x64_input(name: str) -> None:
    model = _make(name, 3, 10).eval()
    with torch.no_grad():
        assert model(_input(3, 64)).shape == (BATCH, 10)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_publications(name: str) -> None:
    n = sum(p.numel() for p in _make(name, 3, 100).parameters()) / 1e6
    assert n == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.03), f"{name}: {n:.3f}M"
