"""model.pretrained=PATH and method.teacher=MODEL:WEIGHTS: weights files written with torchvision's, timm's
and mdistiller's key names (by the reference networks of tests/reference_nets.py) load into the zoo's
models and reproduce the reference networks' logits; what does not fit is one clear line."""
from __future__ import annotations

import shutil
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

from peerdistill.cli import main
from peerdistill.run import train
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.models import build_model
from peerdistill.models.pretrained import read_state_dict, split_weights_spec

from . import reference_nets as ref
from .conftest import TINY, tiny_cfg


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small convolutions: a second OpenMP thread only adds contention on a shared machine."""


def _save(net: torch.nn.Module, path, wrap=lambda sd: sd):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        torch.save(wrap(net.state_dict()), path)
    return str(path)


def _x(channels: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(3))


def _same_logits(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, x_theirs=None) -> None:
    with torch.no_grad():
        want = theirs.eval()(x if x_theirs is None else x_theirs)
        got = ours.eval()(x)
    # The same float32 operations in the same order; BN folding aside, only summation order may differ.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize(("name", "make", "suffix"), [
    ("resnet18_imagenet", ref.tv_resnet18, ".pth"),
    ("resnet50_imagenet", ref.tv_resnet50, ".pth"),
    ("resnet18_imagenet", ref.tv_resnet18, ".safetensors"),  # timm's ResNet names are torchvision's
    ("mobilenetv2_imagenet", ref.TVMobileNetV2, ".pth"),
    ("mobilenetv2_imagenet", ref.TimmMobileNetV2, ".safetensors"),
    ("shufflenetv2_imagenet", ref.tv_shufflenet_v2_x0_5, ".pth"),
])
def test_reference_weights_reproduce_the_reference_logits(tmp_path, name, make, suffix) -> None:
    torch.manual_seed(0)
    theirs = ref.randomize_bn(make(10))
    path = _save(theirs, tmp_path / f"w{suffix}")
    kwargs = {"width": 0.5} if name.startswith("shufflenet") else {}
    ours = build_model(name, 10, 3, pretrained=path, **kwargs)
    _same_logits(ours, theirs, _x())
    bn = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 7 for m in bn)  # the BN statistics came from the file


def test_mdistiller_checkpoint_loads_unwrapped(tmp_path) -> None:
    """A checkpoint holding the state_dict under ``model`` with DDP's ``module.`` prefix."""
    torch.manual_seed(0)
    theirs = ref.randomize_bn(ref.MdistillerMobileNetV1(10))
    path = _save(theirs, tmp_path / "student.pth", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()},
                                                                "epoch": 240})
    _same_logits(build_model("mobilenetv1_imagenet", 10, 3, pretrained=path), theirs, _x())


def test_files_without_num_batches_tracked_load(tmp_path) -> None:
    """Older torchvision files (e.g. resnet18-5c106cde.pth) predate BN's num_batches_tracked buffer."""
    theirs = ref.randomize_bn(ref.tv_resnet18(10))
    torch.save({k: v for k, v in theirs.state_dict().items() if "num_batches_tracked" not in k}, tmp_path / "old.pth")
    _same_logits(build_model("resnet18_imagenet", 10, 3, pretrained=str(tmp_path / "old.pth")), theirs, _x())


def test_own_names_work_for_every_model(tmp_path, monkeypatch) -> None:
    net = ref.randomize_bn(build_model("resnet8", 10, 3))
    _save(net, tmp_path / "resnet8.pt")
    monkeypatch.setenv("HOME", str(tmp_path))  # a path from the command line may start with ~
    _same_logits(build_model("resnet8", 10, 3, pretrained="~/resnet8.pt"), net, _x(size=32))


def test_classifier_of_another_size_is_reinitialised(tmp_path, capsys) -> None:
    theirs = ref.randomize_bn(ref.tv_resnet18(1000))
    path = _save(theirs, tmp_path / "imagenet.pth")
    torch.manual_seed(5)
    fresh = build_model("resnet18_imagenet", 10, 3)
    torch.manual_seed(5)
    ours = build_model("resnet18_imagenet", 10, 3, pretrained=path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1000-class classifier" in err and "10-class classifier is initialised afresh" in err
    torch.testing.assert_close(ours.classifier.weight, fresh.classifier.weight)
    torch.testing.assert_close(ours.classifier.bias, fresh.classifier.bias)
    torch.testing.assert_close(ours.stages[3][1].conv2.weight, theirs.layer4[1].conv2.weight)
    with torch.no_grad():  # the trunk is the reference's: same embedding
        want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(
            theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(theirs.maxpool(theirs.relu(theirs.bn1(
                theirs.conv1(_x())))))))), 1), 1)
        got = ours.eval().forward_head(ours.forward_features(_x())["stage4"], pre_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rgb_weights_on_one_channel_data_sum_the_first_conv(tmp_path, capsys) -> None:
    theirs = ref.randomize_bn(ref.tv_resnet18(10))
    path = _save(theirs, tmp_path / "rgb.pth")
    ours = build_model("resnet18_imagenet", 10, 1, pretrained=path)
    assert "input channels are summed for 1-channel images" in capsys.readouterr().err
    gray = _x(1)
    _same_logits(ours, theirs, gray, gray.expand(-1, 3, -1, -1))  # = the RGB net on the grey image as RGB
    with pytest.raises(PeerdistillError, match="trained on 3-channel images; this data has 2 channels"):
        build_model("resnet18_imagenet", 10, 2, pretrained=path)


def test_bad_weights_files_are_one_clear_line(tmp_path) -> None:
    r18 = ref.tv_resnet18(10)
    good = _save(r18, tmp_path / "r18.pth")
    state = r18.state_dict()
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "missing.pth")
    torch.save({**r18.state_dict(), "head.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "r18.pth").read_bytes()[:100_000])
    st = _save(r18, tmp_path / "r18.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(open(st, "rb").read()[:5000])
    torch.save({"lr": Fraction(1, 10)}, tmp_path / "pickle.pth")  # weights_only=True refuses arbitrary objects
    torch.save([1, 2, 3], tmp_path / "list.pth")
    _save(ref.tv_shufflenet_v2_x0_5(10), tmp_path / "x05.pth")
    cases = [
        ("resnet34_imagenet", good, "does not hold resnet34_imagenet weights: 0 of its tensors have no place in it"),
        ("resnet18_imagenet", "missing.pth", "1 of the model's are missing (e.g. stages.0.0.conv1.weight)"),
        ("resnet18_imagenet", "extra.pth", "1 of its tensors have no place in it (e.g. head.extra.weight)"),
        ("resnet18_imagenet", "cut.pth", "cannot read weights file"),
        ("resnet18_imagenet", "cut.safetensors", "cannot read weights file"),
        ("resnet18_imagenet", "pickle.pth", "cannot read weights file"),
        ("resnet18_imagenet", "list.pth", "holds no state_dict"),
        ("resnet18_imagenet", "nowhere.pth", "does not exist"),
        ("shufflenetv2_imagenet", "x05.pth", "stage2.0.branch1.2.weight has shape (24, 24, 1, 1) in the file and "
                                             "(58, 24, 1, 1) in the model"),
        ("mobilenetv1_imagenet", good, "known: peerdistill, mdistiller"),
    ]
    for name, path, expected in cases:
        with pytest.raises(PeerdistillError) as e:
            build_model(name, 10, 3, pretrained=str(tmp_path / path))
        assert expected in str(e.value) and "\n" not in str(e.value), (expected, str(e.value))


def test_read_state_dict_keys_are_the_files(tmp_path) -> None:
    net = ref.tv_resnet18(10)
    for suffix in (".pth", ".safetensors"):
        state = read_state_dict(_save(net, tmp_path / f"w{suffix}"))
        assert sorted(state) == sorted(net.state_dict())  # safetensors stores its keys sorted
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_teacher_spec_parsing() -> None:
    assert split_weights_spec("resnet34_imagenet:/w/resnet34.pth") == ("resnet34_imagenet", "/w/resnet34.pth")
    assert split_weights_spec("runs/kd-teacher") is None
    assert split_weights_spec("C:/runs/teacher") is None  # not a model name: a path
    assert split_weights_spec("resnet34_imagenet:") is None


# ------------------------------------------------------------------ through the config and the CLI


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_pretrained_run_trains_and_bad_paths_stop_before_the_run_directory(tmp_path, capsys) -> None:
    path = _save(ref.randomize_bn(ref.tv_resnet18(1000)), tmp_path / "imagenet.pth")
    base = [*TINY, "model=resnet18_imagenet", "epochs=1", "data.size=32", "method=independent", "peers=1"]
    assert main(["train", "--out", str(tmp_path / "ok"), *base, f"model.pretrained={path}"]) == 0
    assert "the 4-class classifier is initialised afresh" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "bad"), *base, f"model.pretrained={tmp_path / 'no.pth'}"]) == 2
    assert "weights file" in _err(capsys) and not (tmp_path / "bad").exists()
    assert main(["train", "--out", str(tmp_path / "bad"), *base, "model.pretrained=3"]) == 2
    assert "parameter 'pretrained' of model 'resnet18_imagenet' must be str" in _err(capsys)


def test_teacher_from_a_weights_file_gives_the_reference_logits(tmp_path) -> None:
    theirs = ref.randomize_bn(ref.tv_resnet18(4))  # TINY data: 4 classes, 3 channels
    path = _save(theirs, tmp_path / "teacher.pth")
    tr = Trainer(tiny_cfg("method=kd", f"method.teacher=resnet18_imagenet:{path}",
                          "method.teacher_model=resnet18_imagenet", "precision=fp32", "channels_last=false"), None)
    x = _x(3, 16)
    with torch.no_grad():
        got = tr.teacher([x])[0].logits
    _same_logits(tr.teacher.nets[0], theirs, x)
    assert not tr.teacher.training and not any(p.requires_grad for p in tr.teacher.parameters())
    assert got.shape == (2, 4)


@pytest.mark.parametrize(("override", "expected"), [
    ("method.teacher=resnet18_imagenet:{missing}", "teacher weights file"),
    ("method.teacher=resnet18_imagenet:{imagenet}", "has a 1000-class classifier; this run has 4 classes"),
    ("method.teacher_peer=1", "is a single network; teacher_peer=1"),
    ("method.teacher_model=resnet34_imagenet", "is a resnet18_imagenet, not the expected resnet34_imagenet"),
])
def test_teacher_weights_errors_stop_before_the_run_directory(tmp_path, capsys, override, expected) -> None:
    files = {"missing": tmp_path / "no.pth", "imagenet": _save(ref.tv_resnet18(1000), tmp_path / "in1k.pth"),
             "ok": _save(ref.tv_resnet18(4), tmp_path / "t.pth")}
    args = ["train", "--out", str(tmp_path / "run"), *TINY, "method=kd", f"method.teacher=resnet18_imagenet:{files['ok']}",
            override.format(**files)]
    assert main(args) == 2
    assert expected in _err(capsys) and not (tmp_path / "run").exists()


def test_teacher_run_that_started_from_weights_loads_without_the_weights_file(tmp_path) -> None:
    path = _save(ref.tv_resnet18(4), tmp_path / "start.pth")
    teacher_dir = tmp_path / "teacher"
    train(tiny_cfg("model=resnet18_imagenet", f"model.pretrained={path}", "method=independent", "peers=1",
                   "epochs=1", "data.size=32"), teacher_dir, echo=False)
    shutil.move(path, tmp_path / "moved.pth")  # the checkpoint holds the weights; the file is not needed
    tr = Trainer(tiny_cfg("method=kd", f"method.teacher={teacher_dir}", "epochs=1"), None)
    assert type(tr.teacher.nets[0].stem.conv1) is torch.nn.Conv2d
