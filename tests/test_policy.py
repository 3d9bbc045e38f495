"""RandAugment / TrivialAugment on training batches (``data.auto_augment``): per-image draws, determinism,
the global-batch draws under torchrun, the config, and a run through the in-memory and streamed paths."""
from __future__ import annotations

import builtins
import math

import pytest
import torch

from peerdistill.config import load
from peerdistill.data.batch_augment import BatchAugment
from peerdistill.data.policy import PolicyAugment
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError

pytest.importorskip("kornia")


def _batch(b: int = 32, c: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("select", ["image", "batch"])
def test_policy_is_a_function_of_the_generator(name, select):
    p, x = PolicyAugment(name, 2, 9, select), _batch()
    a = p(x, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, p(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, p(x, torch.Generator().manual_seed(4)))
    state = torch.get_rng_state()
    p(x, torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.get_rng_state())  # kornia's draws leave the global generator alone


def test_each_image_draws_its_own_distinct_operations():
    p = PolicyAugment("randaugment", n=3)
    ops = p._draw(4000, torch.Generator().manual_seed(0))
    assert ops.shape == (4000, 3)
    assert all(len(set(row)) == 3 for row in ops.tolist())  # without replacement within an image
    counts = torch.bincount(ops.flatten(), minlength=len(p._table)).double()
    expected = ops.numel() / len(p._table)  # uniform over the table
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    assert len({tuple(r) for r in ops[:64].tolist()}) > 32  # the images of one batch do not share a draw


def test_per_image_selection_applies_the_drawn_operation_to_its_images():
    """TrivialAugment with a table of two deterministic operations: each image shows the one it drew."""
    from kornia.enhance import equalize

    p = PolicyAugment("trivialaugment")
    p._table = [[("invert", 0, 1)], [("equalize", 0, 1)]]
    p._ops.clear()
    x = _batch(64)
    gen = torch.Generator().manual_seed(1)
    drawn = p._draw(64, torch.Generator().manual_seed(1))[:, 0]
    out = p(x, gen)
    inverted = 255 - x
    equalized = equalize(x.float() / 255).mul(255).round().clamp(0, 255).to(torch.uint8)
    for i, k in enumerate(drawn.tolist()):
        assert torch.equal(out[i], inverted[i] if k == 0 else equalized[i])
    assert 0 < int(drawn.sum()) < 64


def test_two_processes_draw_the_global_batch_operations():
    p = PolicyAugment("randaugment")
    whole = p._draw(16, torch.Generator().manual_seed(7))
    for rank in range(2):
        p.shard = (rank, 2)
        assert torch.equal(p._draw(8, torch.Generator().manual_seed(7)), whole[rank::2])


def test_grey_batches_keep_one_channel():
    out = PolicyAugment("randaugment")(_batch(8, c=1), torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 24, 24)


def test_batch_augment_applies_the_policy_before_normalising():
    x = _batch(8)
    plain = BatchAugment((0.5,) * 3, (0.25,) * 3, padding=0, flip=False)
    pol = BatchAugment((0.5,) * 3, (0.25,) * 3, padding=0, flip=False, policy=PolicyAugment("randaugment"))
    expected = plain.normalize(PolicyAugment("randaugment")(x, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(pol(x, torch.Generator().manual_seed(2)), expected, rtol=0, atol=0)


def test_policy_config_is_typed_and_checked():
    with pytest.raises(PeerdistillError, match=r"data\.auto_augment"):
        load(None, ["data.auto_augment=autocontrast"])
    with pytest.raises(PeerdistillError, match=r"data\.ra_m"):
        load(None, ["data.ra_m=30"])
    with pytest.raises(PeerdistillError, match=r"data\.ra_n must be 1-15"):
        Trainer(load(None, ["data.name=synthetic", "model=resnet8", "device=cpu", "data.auto_augment=randaugment",
                            "data.ra_n=16"]))


def test_missing_kornia_is_one_line(monkeypatch):
    real = builtins.__import__

    def no_kornia(name, *args, **kwargs):
        if name.startswith("kornia"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kornia)
    with pytest.raises(PeerdistillError, match=r"data\.auto_augment=trivialaugment needs kornia: pip install"):
        PolicyAugment("trivialaugment")


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_trains_with_randaugment(tmp_path, stream):
    from .imagenet_like import make_imagenet_like

    make_imagenet_like(tmp_path / "f", 24, 8, n_classes=2, sides=(20, 24), target_kb=None)
    cfg = load(None, ["data.name=imagefolder", f"data.root={tmp_path / 'f'}", f"data.stream={str(stream).lower()}",
                      "data.image_size=16", "data.workers=0", "data.val_split=0", "model=resnet8", "method=dml",
                      "batch_size=8", "epochs=1", "precision=fp32", "device=cpu", "tensorboard=false",
                      "progress=false", "data.auto_augment=randaugment"])
    t = Trainer(cfg)
    assert isinstance(t.augment.policy, PolicyAugment) and t.augment.policy.name == "randaugment"
    calls = []

    class Counted(PolicyAugment):
        def __call__(self, x, gen):
            calls.append(len(x))
            return super().__call__(x, gen)

    t.augment.policy.__class__ = Counted
    summary = t.fit()
    assert calls == [8, 8, 8]  # every training batch, after the crop, before normalising
    assert math.isfinite(summary["final"]["test"]["peer0"]["nll"])
