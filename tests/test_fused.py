"""The fused cohort (one vmapped network for all peers) computes what the per-peer loop computes."""
from __future__ import annotations

import copy

import pytest
import torch

from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.models import build_model
from peerdistill.models.cohort import Cohort, build_cohort

from .conftest import tiny_cfg


# Model options for the comparison: train-mode dropout would draw differently in the two forms.
ARGS = {"mobilenetv2_imagenet": {"dropout": 0.0}}


def _pair(model: str = "resnet8", n: int = 3) -> tuple[Cohort, Cohort]:
    """A per-peer-loop cohort and its fused copy, in float64: the two routes compute the same function, which
    float64 shows to its precision on any CPU (in float32 their kernels round differently)."""
    torch.manual_seed(0)
    loop = build_cohort([model], n, 5, 3, ARGS.get(model, {})).double()
    fused = copy.deepcopy(loop)
    fused.fused = True
    return loop, fused


def _same(b: torch.Tensor, a: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=msg or None)


@pytest.mark.parametrize("model", ["resnet8", "wrn_16_1", "vgg8"])
@pytest.mark.parametrize("distinct_views", [False, True])
def test_fused_matches_loop_outputs_grads_and_bn_stats(model: str, distinct_views: bool) -> None:
    loop, fused = _pair(model)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    views = [torch.randn(8, 3, 16, 16, dtype=torch.float64) for _ in range(3)] if distinct_views else [x] * 3
    outs = {}
    for name, cohort in (("loop", loop), ("fused", fused)):
        cohort.train()
        res = cohort(views, ("*",))
        loss = sum((o.logits.square().mean() + o.embedding.mean() + sum(m.mean() for m in o.maps.values()))
                   * (i + 1) for i, o in enumerate(res))
        loss.backward()
        outs[name] = res
    for a, b in zip(outs["loop"], outs["fused"]):
        _same(b.logits, a.logits)
        _same(b.embedding, a.embedding)
        assert a.maps.keys() == b.maps.keys() and len(a.maps) == len(loop.nets[0].stage_names)
        for k in a.maps:
            _same(b.maps[k], a.maps[k])
    for (name, pa), pb in zip(loop.named_parameters(), fused.parameters()):
        _same(pb.grad, pa.grad, name)
    for (name, ba), bb in zip(loop.named_buffers(), fused.buffers()):
        _same(bb, ba, name)
    tracked = [int(m.num_batches_tracked) for m in fused.nets[2].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert tracked and set(tracked) == {1}


@pytest.mark.parametrize("model", ["resnet50_imagenet", "mobilenetv1_imagenet", "mobilenetv2_imagenet",
                                   "shufflenetv2_imagenet", "hcgnet_a1"])
def test_fused_matches_loop_for_deep_models_in_float64(model: str, one_thread: None) -> None:
    """Deep freshly initialised networks whose train-mode BN normalises 1x1-2x2 maps amplify float32
    reassociation (grouped vs separate convolutions) to several % of a gradient, so the forms are
    compared in float64, where they must agree to rounding."""
    loop, fused = _pair(model, 2)  # in float64
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for name, cohort in (("loop", loop), ("fused", fused)):
        res = cohort.train()([x, x], ("*",))
        sum((o.logits.square().mean() + o.embedding.mean()) * (i + 1) for i, o in enumerate(res)).backward()
        outs[name] = res
    for a, b in zip(outs["loop"], outs["fused"]):
        torch.testing.assert_close(b.logits, a.logits, atol=1e-10, rtol=1e-9)
    for (name, pa), pb in zip(loop.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-9 * float(pa.grad.abs().max()) + 1e-12, rtol=1e-8,
                                   msg=name)
    for (name, ba), bb in zip(loop.named_buffers(), fused.buffers()):
        torch.testing.assert_close(bb, ba, atol=1e-10, rtol=1e-9, msg=name)


def test_fused_eval_uses_running_stats_and_leaves_them_alone() -> None:
    loop, fused = _pair()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for cohort in (loop, fused):
        cohort.train()
        cohort([x] * 3)  # move the running statistics away from their initial values
        cohort.eval()
    before = [b.clone() for b in fused.buffers()]
    with torch.no_grad():
        for a, b in zip(loop([x] * 3), fused([x] * 3)):
            _same(b.logits, a.logits)
    assert all(torch.equal(a, b) for a, b in zip(before, fused.buffers()))


def test_fused_cohort_errors() -> None:
    with pytest.raises(PeerdistillError, match="same model"):
        build_cohort(["resnet8", "resnet14"], 2, 5, 3, {}, fused=True)
    with pytest.raises(PeerdistillError, match="independent cohort"):
        build_cohort(["resnet8"], 3, 5, 3, {}, topology="branched", fused=True)
    with pytest.raises(PeerdistillError, match="at least 2 peers"):
        Cohort([build_model("resnet8", 5, 3)], fused=True)


def test_fused_training_matches_loop_training_and_checkpoints_are_interchangeable(tmp_path) -> None:
    common = ["method=dml", "peers=2", "precision=fp32", "epochs=1"]
    results = {}
    for fused in (False, True):
        tr = Trainer(tiny_cfg(*common, f"fused={str(fused).lower()}"), tmp_path / str(fused))
        assert tr.cohort.fused is fused
        results[fused] = (tr.train_epoch()["loss"], tr.evaluate(tr.data.test))
        tr.save("last.pt")
    # float32 kernels of the two routes round differently and training amplifies it: measured ~1e-7 relative
    # after this epoch's 5 steps, so 1e-3 is a bound on a divergence, far from any real difference
    for k, v in results[False][0].items():
        assert results[True][0][k] == pytest.approx(v, rel=1e-3), k
    assert results[True][1]["peer0"]["top1"] == pytest.approx(results[False][1]["peer0"]["top1"], abs=2.0)
    plain = Trainer(tiny_cfg(*common), None)
    plain.load(tmp_path / "True" / "checkpoints" / "last.pt")  # a fused run's checkpoint loads unfused
    one_image = 100.0 / len(plain.data.test)  # a near-tie between two logits may flip one image's argmax
    assert plain.evaluate(plain.data.test)["peer1"]["top1"] == pytest.approx(results[True][1]["peer1"]["top1"],
                                                                            abs=1.01 * one_image)


def test_fused_is_rejected_for_a_branched_method() -> None:
    with pytest.raises(PeerdistillError, match="independent cohort"):
        Trainer(tiny_cfg("method=one", "peers=3", "fused=true"), None)
