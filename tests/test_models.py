"""Every registered model satisfies the StagedNet contract (models/base.py) on small CPU batches.

The ImageNet models (``*_imagenet``) are made for 224x224 images; here they run at 28-64 pixels (their last
map is 1x1 or 2x2), which exercises the contract at a fraction of the cost. Their parameter counts are
checked at 1000 classes without a forward pass.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from peerdistill.models import MODELS, StagedNet, build_model
from peerdistill.models.cohort import build_cohort


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Batches of 2 small images: a second OpenMP thread only adds contention on a shared machine."""


ALL = list(MODELS)
NEW = [n for n in ALL if n.endswith("_imagenet") or n.startswith("hcgnet")]
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
    "hcgnet_a1": 1.10,  # MCL-OKD's table; the authors' README: 1.1M
    "hcgnet_a2": 3.1,  # the authors' README (winycg/HCGNet): 3.1M
}

# Exact parameter counts at 1000 classes: torchvision's ``num_params`` (its model documentation).
TORCHVISION_PARAMS = {
    ("resnet18_imagenet", ()): 11_689_512,
    ("resnet34_imagenet", ()): 21_797_672,
    ("resnet50_imagenet", ()): 25_557_032,
    ("mobilenetv2_imagenet", ()): 3_504_872,
    ("shufflenetv2_imagenet", (("width", 0.5),)): 1_366_792,
    ("shufflenetv2_imagenet", ()): 2_278_604,
    ("shufflenetv2_imagenet", (("width", 1.5),)): 3_503_624,
    ("shufflenetv2_imagenet", (("width", 2.0),)): 7_393_996,
}


def _make(name: str, cin: int, classes: int) -> StagedNet:
    torch.manual_seed(0)
    return build_model(name, num_classes=classes, in_channels=cin)


def _input(cin: int, size: int) -> torch.Tensor:
    return torch.randn(BATCH, cin, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_has_the_zoo() -> None:
    expected = {"resnet8", "resnet32", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2",
                "wrn_40_1", "wrn_40_2", "wrn_28_4", "wrn_20_8", "vgg8", "vgg11", "vgg13", "vgg16",
                "mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet18", "resnet34", "densenet40_12",
                "hcgnet_a1", "hcgnet_a2", "resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet",
                "mobilenetv1_imagenet", "mobilenetv2_imagenet", "shufflenetv2_imagenet"}
    assert expected <= set(ALL)
    for name in ALL:  # every constructor: (num_classes, in_channels=3, then its own options, all defaulted)
        params = MODELS.params(name)
        assert list(params)[:2] == ["num_classes", "in_channels"] and params["in_channels"] == 3, name
        assert inspect.Parameter.empty not in params.values(), name
        assert params["num_classes"] == (1000 if name.endswith("_imagenet") else 10), name


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


@pytest.mark.parametrize(("name", "args"), sorted(TORCHVISION_PARAMS), ids=lambda v: str(v))
def test_imagenet_parameter_count_equals_torchvision(name: str, args: tuple) -> None:
    n = sum(p.numel() for p in build_model(name, 1000, 3, **dict(args)).parameters())
    assert n == TORCHVISION_PARAMS[(name, args)]


def test_mobilenetv1_parameter_count_equals_the_reference_layers() -> None:
    """MobileNetV1 of mdistiller (DKD's ResNet-50 -> MobileNetV1 student), counted from its layer list: a
    3x3 conv-BN stem to 32 channels, 13 (dw3x3-BN, 1x1-BN) blocks, a 1024 -> 1000 linear layer
    (4.23M, the count timm's results table gives for its mobilenetv1_100 of the same shapes)."""
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    expected = 3 * 32 * 9 + 2 * 32
    expected += sum(9 * a + 2 * a + a * b + 2 * b for a, b in zip(widths, widths[1:]))
    expected += 1024 * 1000 + 1000
    assert sum(p.numel() for p in build_model("mobilenetv1_imagenet", 1000, 3).parameters()) == expected == 4_231_976


@pytest.mark.parametrize("name", NEW)
def test_branched_cohort_shares_the_trunk(name: str) -> None:
    torch.manual_seed(0)
    cohort = build_cohort([name], 2, 10, 3, {}, "branched").eval()
    a, b = cohort.nets
    assert a.stem is b.stem and all(a.stages[i] is b.stages[i] for i in range(len(a.stages) - 1))
    assert a.stages[-1] is not b.stages[-1] and a.classifier is not b.classifier
    with torch.no_grad():
        outs = cohort([_input(3, 32)] * 2, ("*",))
    assert [tuple(o.logits.shape) for o in outs] == [(BATCH, 10)] * 2
    assert list(outs[0].maps) == list(a.stage_names)


@pytest.mark.parametrize(("ff", "rf"), [(2, 2), (4, 4)])  # SMG modules / transitions
def test_hcgnet_gates_follow_the_authors_forward(ff: int, rf: int) -> None:
    """HCGNet's forget and update gates against the authors' forward (winycg/HCGNet HCGNet_CIFAR.py
    ``_SMG.forward`` after the two convolutions), written out as they compute it."""
    from peerdistill.models.hcgnet import Gates

    torch.manual_seed(0)
    g = Gates(16, ff, rf).eval()
    for bn in (g.bn_attention, g.bn_forget, g.conv_3x3.norm, g.conv_5x5.norm):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 6, 6)
    b, c, h, w = x.shape
    pool = nn.AdaptiveAvgPool2d((1, 1))
    with torch.no_grad():
        fw = nn.functional.softmax(torch.flatten(g.global_forget_context(x), start_dim=1), 1).reshape(-1, 1, h, w)
        sw = pool(x * fw) * h * w
        sw = torch.tanh(g.bn_forget(torch.flatten(g.fc1(sw), start_dim=1))).reshape(-1, c // ff, 1, 1)
        sw = torch.sigmoid(g.fc2(sw))
        x3, x5 = g.conv_3x3(x), g.conv_5x5(x)
        w3 = nn.functional.softmax(torch.flatten(g.global_context3x3(x3), start_dim=1), 1).reshape(-1, 1, h, w)
        w5 = nn.functional.softmax(torch.flatten(g.global_context5x5(x5), start_dim=1), 1).reshape(-1, 1, h, w)
        x3, x5 = pool(x3 * w3) * h * w, pool(x5 * w5) * h * w
        att = torch.tanh(g.bn_attention(torch.flatten(g.fcall(torch.cat([x3, x5], 1)), start_dim=1)))
        att = att.reshape(-1, 2 * c // rf, 1, 1)
        wa = nn.functional.softmax(torch.cat([torch.unsqueeze(torch.flatten(g.fc3x3(att), start_dim=1), 1),
                                              torch.unsqueeze(torch.flatten(g.fc5x5(att), start_dim=1), 1)], 1), 1)
        want = x * sw + wa[:, 0, :].reshape(-1, c, 1, 1) * x3 + wa[:, 1, :].reshape(-1, c, 1, 1) * x5
        torch.testing.assert_close(g(x), want, rtol=1e-5, atol=1e-6)
