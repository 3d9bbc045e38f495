"""Good-DA-in-KD: T. stddev, the augmentation registry, CutMixPick, the KD-with-extra-augmentation
protocol, and the tstddev / correlate commands. Golden values are written out or computed here with
plain numpy / torch, never with the library's helpers."""
from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch
import yaml

from peerdistill.cli import main
from peerdistill.config import load
from peerdistill.data.batch_augment import BatchAugment
from peerdistill.data.augmentations import AUGMENTATIONS, PAPER_AUGS, aug_label, build_augmentation, to_uint8
from peerdistill.data.policy import KORNIA_EXTRA
from peerdistill.data.mix import MIXERS, random_perm
from peerdistill.data.pick import CutMixPick
from peerdistill.data.views import ViewContext
from peerdistill.engine.checkpoint import load_checkpoint
from peerdistill.run import train
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.methods import METHODS
from peerdistill.methods.kd import AUG
from peerdistill.metrics.tstddev import GroupMeans, t_stddev

from .conftest import killed_and_resumed, no_host_reads
from .reference import close32, f32, np_ce_mag, np_kd, np_kd_mag, np_log_softmax

BASE = ["data.name=synthetic", "data.size=96", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=128", "threads=1"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gooda") / "teacher"
    train(load(None, [*BASE, "method=independent", "peers=1"]), out_dir=out, echo=False)
    return out


def kd_trainer(teacher, *over: str) -> Trainer:
    return Trainer(load(None, [*BASE, "method=kd", f"method.teacher={teacher}", "peers=1", *over]), None)


def np_entropy(z):
    lp = np_log_softmax(z)
    return -(np.exp(lp) * lp).sum(1)


def context(gen, teacher=None, peer=None, channels=3):
    ba = BatchAugment(MEAN[:channels], STD[:channels], 2)
    return ViewContext(lambda u: ba(u, gen), ba.normalize, None, gen, 1, teacher, peer), ba


# ------------------------------------------------------------------ T. stddev
@pytest.mark.numerical
def test_t_stddev_of_fixed_teacher_outputs_is_the_hand_value():
    # two classes, group_iters=2, each iteration: (original, augmented) one row each
    iters = [([1, 0], [0, 1]), ([1, 0], [1, 0]),  # group 1: mean [0.75, 0.25]
             ([0, 1], [0, 1]), ([1, 0], [0, 1]),  # group 2: mean [0.25, 0.75]
             ([0.5, 0.5], [0.5, 0.5])]             # an incomplete group: not counted
    acc = GroupMeans(2)
    for o, a in iters:
        acc.add(torch.tensor([o], dtype=torch.float32), torch.tensor([a], dtype=torch.float32))
    res = acc.result()
    # per class: values 0.75, 0.25 -> unbiased std sqrt(((0.25)^2 + (0.25)^2) / 1) = sqrt(0.125)
    assert res["t_stddev"] == pytest.approx(math.sqrt(0.125), rel=1e-12)
    assert res["groups"] == 2
    # entropy: only the two 0.5/0.5 rows of the 10 carry ln 2 each
    assert res["entropy"] == pytest.approx(2 * math.log(2) / 10, rel=1e-9)
    groups = torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.5, 0.1], [0.3, 0.5, 0.2]])
    assert t_stddev(groups) == pytest.approx((0.1 + 0.0 + 0.1) / 3, rel=1e-6)
    with pytest.raises(PeerdistillError, match="at least 2 groups"):
        t_stddev(groups[:1])


# ------------------------------------------------------------------ augmentations
def test_derangement_and_goodda_cutmix_never_pair_an_image_with_itself():
    for seed in range(300):
        b = 2 + seed % 7
        perm = random_perm(b, torch.Generator().manual_seed(seed), torch.device("cpu"), derangement=True)
        assert sorted(perm.tolist()) == list(range(b)) and not (perm == torch.arange(b)).any()
    aug = build_augmentation("cutmix")
    x = torch.randn(6, 3, 16, 16)
    for seed in range(50):
        out = aug(x, context(torch.Generator().manual_seed(seed))[0])
        assert out.mix is not None and not (out.mix.perms[1] == out.mix.perms[0]).any()


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixer_and_augmentation_of_one_name_are_one_definition_with_two_sets_of_defaults(name):
    """``extra_aug=NAME`` and ``mixer=NAME`` are the one mixer: the same parameters, checks and kernel; only the
    documented defaults differ (the augmentation mixes every batch; Good-DA's CutMix is a derangement)."""
    good_da = {"mixup": {"prob": 1.0}, "cutmix": {"prob": 1.0, "derangement": True}}[name]
    assert AUGMENTATIONS.params(name) == {**MIXERS.params(name), **good_da}
    assert AUGMENTATIONS.hints(name) == MIXERS.hints(name)
    with pytest.raises(PeerdistillError, match="parameter 'prob' of augmentation"):
        build_augmentation(name, {"prob": 2})
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    mixer_defaults = {k: v for k, v in MIXERS.params(name).items()}
    # same arguments, same seeded draws -> the same lambda, box, permutation and mixed images (and the same skips)
    for args in ({}, mixer_defaults, {"alpha": 0.4, "prob": 0.5, "derangement": True}):
        full = {**AUGMENTATIONS.params(name), **args}
        for seed in range(12):
            mixed, rec = MIXERS.build(name, **full)(x, torch.Generator().manual_seed(seed))
            out = build_augmentation(name, args)(x, context(torch.Generator().manual_seed(seed))[0])
            assert (rec is None) == (out.mix is None)
            assert torch.equal(out.x, mixed)
            if rec is not None:
                assert torch.equal(out.mix.perms, rec.perms) and torch.equal(out.mix.weights, rec.weights)
                assert torch.equal(out.mix.pixel_weights, rec.pixel_weights)
    # with the mixer's defaults the augmentation is mixer=NAME draw for draw, skipped batches included
    skips = 0
    for seed in range(12):
        mixed, rec = MIXERS.build(name)(x, torch.Generator().manual_seed(seed))
        out = build_augmentation(name, mixer_defaults)(x, context(torch.Generator().manual_seed(seed))[0])
        assert torch.equal(out.x, mixed) and (rec is None) == (out.mix is None)
        skips += rec is None
    assert skips == 0 if name == "mixup" else 0 < skips < 12  # cutmix's mixer default mixes half the batches


def test_pixel_augmentations_work_on_the_exact_uint8_images_of_the_view():
    g = torch.Generator().manual_seed(0)
    ctx, ba = context(g)
    u = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    x = ba.normalize(u)
    assert torch.equal(to_uint8(x, ctx), u)  # the exact inverse of the normalisation
    flipped = build_augmentation("flip", {"same_on_batch": True})
    outs = [flipped(x, context(torch.Generator().manual_seed(s))[0]).x for s in range(8)]
    assert any(torch.equal(o, ba.normalize(u.flip(3))) for o in outs) and any(torch.equal(o, x) for o in outs)
    crop = build_augmentation("crop_flip", {"padding": 2})
    out = to_uint8(crop(x, ctx).x, ctx)
    for i in range(8):  # every image is a (flipped) shifted window of the zero-padded original
        padded = torch.nn.functional.pad(u[i], (2, 2, 2, 2))
        wins = [padded[:, a:a + 16, b:b + 16] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in wins)
    holes = build_augmentation("cutout")(x, ctx).x  # 16 px -> side 4, zero in normalised space
    assert all(0 < int((holes[i] == 0).all(0).sum()) <= 16 for i in range(8))


def test_cutout_cuts_one_hole_per_batch_as_the_code_or_one_per_image():
    """The authors' ``cutout`` (Good-DA ``helper/loops.py``) multiplies the batch by one (H, W) mask: the
    default, and the paper's list; ``same_on_batch=false`` draws a location per image."""
    x = torch.randn(16, 3, 16, 16) + 5.0  # no pixel is 0 before the cut

    def hole_masks(aug, seed):
        out = aug(x, context(torch.Generator().manual_seed(seed))[0]).x
        return [(out[i] == 0).all(0) for i in range(16)]  # (H, W) per image

    code, per_image = build_augmentation("cutout"), build_augmentation("cutout", {"same_on_batch": False})
    assert "cutout" in PAPER_AUGS and aug_label("cutout", {"same_on_batch": True}) == "cutout"
    for seed in range(5):
        masks = hole_masks(code, seed)
        assert masks[0].any() and all(torch.equal(m, masks[0]) for m in masks)  # one location for all
        assert int(masks[0].sum()) <= 16 and bool((x * ~masks[0] == code(x, context(
            torch.Generator().manual_seed(seed))[0]).x).all())  # nothing else changes
    spread = [len({tuple(m.nonzero()[0].tolist()) for m in hole_masks(per_image, s)}) for s in range(5)]
    assert max(spread) > 1  # per image: different locations within a batch


def test_autoaugment_shape_dtype_and_determinism_under_a_seed():
    pytest.importorskip("kornia")
    u = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    for channels, select in ((3, "batch"), (1, "image")):
        aug = build_augmentation("autoaugment", {"policy": "cifar10", "select": select})
        ctx, ba = context(torch.Generator().manual_seed(5), channels=channels)
        x = ba.normalize(u[:, :channels])
        state = torch.get_rng_state()
        a = aug(x, ctx).x
        assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is left as it was
        b = aug(x, context(torch.Generator().manual_seed(5), channels=channels)[0]).x
        c = aug(x, context(torch.Generator().manual_seed(6), channels=channels)[0]).x
        assert a.shape == x.shape and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.equal(ba.normalize(to_uint8(a, ctx)), a)  # valid uint8 levels, normalised
    aug = build_augmentation("autoaugment", {"policy": "imagenet"})
    assert aug(x, ctx).x.shape == x.shape


def test_missing_kornia_is_a_one_line_error_naming_the_extra(monkeypatch):
    real = builtins.__import__

    def no_kornia(name, *a, **k):
        if name.startswith("kornia"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_kornia)
    with pytest.raises(PeerdistillError) as e:
        build_augmentation("autoaugment")
    assert KORNIA_EXTRA in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ CutMixPick
def test_picker_keeps_exactly_the_highest_scoring_images_and_their_labels(monkeypatch):
    b, k = 4, 5
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).contiguous()
    picker = CutMixPick(mix_n_run=2)
    drawn = []
    real_draw = picker.base.draw
    picker.base.draw = lambda *a: drawn.append(real_draw(*a)) or drawn[-1]
    hand = torch.tensor([5.0, 1.0, 7.0, 3.0, 2.0, 8.0, 0.0, 6.0])  # scores of the 2B pooled images
    monkeypatch.setattr(CutMixPick, "scores", lambda self, pool, x, ctx: (hand, None))
    rec, logits = picker.pick(x, torch.Generator().manual_seed(1), None)
    keep = [5, 2, 7, 0]  # the 4 highest: 8, 7, 6, 5
    assert logits is None and sorted(rec.perms[0].tolist()) == sorted(r % b for r in keep)
    pool = torch.cat([r.mix_images(x) for r in drawn])
    assert torch.equal(rec.mix_images(x), pool[keep])
    y = torch.tensor([0, 1, 2, 3])
    onehot = torch.eye(k)[y]
    for j, row in enumerate(keep):  # label of pooled row `row`: lam y_i + (1 - lam) y_perm(i)
        r, i = drawn[row // b], row % b
        lam, partner = float(r.weights[0, i]), int(r.perms[1, i])
        expected = lam * onehot[i] + (1 - lam) * onehot[partner]
        assert torch.allclose(rec.mix(onehot)[j], expected)
        own = float((rec.mix_images(x)[j] == x[i]).float().mean())
        assert own == pytest.approx(lam, abs=1e-6)  # the label weight is the true pixel fraction


@pytest.mark.numerical
@pytest.mark.parametrize("criterion", ["teacher_entropy", "student_entropy", "kld", "dissimilarity"])
def test_picker_scores_match_hand_formulas(criterion):
    g = torch.Generator().manual_seed(2)
    t_pool, s_pool, t_orig = (torch.randn(n, 5, generator=g) for n in (8, 8, 4))
    x = torch.randn(4, 3, 16, 16, generator=g)
    teacher = lambda z: t_orig if z.shape[0] == 4 else t_pool  # noqa: E731
    peer = lambda i, z: s_pool  # noqa: E731
    ctx = ViewContext(lambda u: u, lambda u: u, None, g, 1, teacher, peer)
    picker = CutMixPick(criterion=criterion, temperature=3.0)
    scores, _ = picker.scores(torch.zeros(8, 3, 16, 16), x, ctx)
    tp, sp, to = (t.double().numpy() for t in (t_pool, s_pool, t_orig))  # the reference in float64
    # The scores are float32: a log-softmax rounds within |log p| + 1 + 2 max|z| per entry, so an entropy
    # within H + 1 + 2 max|z|, a KL within the cross-entropy and entropy it cancels; probabilities within
    # (1 + 2 max|z|) of their size, so a squared distance within 2 (p + q)^2 of that.
    def lse_mag(z):
        return 1 + 2 * np.abs(z).max(1)

    if criterion in ("teacher_entropy", "student_entropy"):
        z = tp if criterion == "teacher_entropy" else sp
        hand, mag = np_entropy(z), np_entropy(z) + lse_mag(z)
    elif criterion == "kld":
        lt, ls = np_log_softmax(tp / 3), np_log_softmax(sp / 3)
        hand = (np.exp(lt) * (lt - ls)).sum(1)
        mag = (np.exp(lt) * (np.abs(lt) + np.abs(ls))).sum(1) + lse_mag(tp / 3) + lse_mag(sp / 3)
    else:
        pp, po = np.exp(np_log_softmax(tp)), np.exp(np_log_softmax(to))
        hand = np.array([min(((pp[i] - po[j]) ** 2).sum() for j in range(4)) for i in range(8)])
        mag = np.array([max((2 * (pp[i] + po[j]) ** 2).sum() for j in range(4)) for i in range(8)])
        mag *= np.maximum(lse_mag(tp), lse_mag(to).max())
    assert close32(scores, hand, mag)


def test_picker_without_a_teacher_is_a_one_line_error():
    with pytest.raises(PeerdistillError) as e:
        CutMixPick().pick(torch.randn(4, 3, 8, 8), torch.Generator(), ViewContext(None, None, None, None, 1))
    assert "teacher" in str(e.value) and "\n" not in str(e.value)
    tr = Trainer(load(None, [*BASE, "method=dml", "peers=2", "mixer=cutmixpick",
                             "mixer.criterion=student_entropy", "mixer.peer=1"]), None)
    assert all(torch.isfinite(v) for v in tr.train_step(next(iter(tr.train_loader))).values())


# ------------------------------------------------------------------ the KD protocol
@pytest.mark.numerical
def test_protocol_loss_matches_an_independent_computation(teacher_dir):
    tr = kd_trainer(teacher_dir, "method.extra_aug=cutmix", "method.lw_mix=[1, 0.5, 2]")
    rec = tr.step_record(next(iter(tr.train_loader)))
    terms = {k: float(v.detach()) for k, v in tr.method.losses(rec).items()}
    assert set(terms) == {"ce0", "kd0", "ce_aug0", "kd_aug0"}
    x, y = rec.views[0].x, rec.labels.numpy()
    s_aug_out = rec.extra[AUG][0]
    assert s_aug_out.logits.requires_grad  # the student's second forward has gradient
    net, teacher = tr.cohort.nets[0], tr.teacher
    t_engine, t_aug_engine = rec.teacher[0].logits, rec.teacher_extra[AUG][0].logits
    with torch.no_grad():  # the teacher scored the student's view (the same computation re-run)
        assert close32(teacher([x])[0].logits, t_engine, t_engine.abs().max())
    as64 = lambda t: t.detach().double().numpy()  # noqa: E731  the reference in float64
    s, s_aug, t, t_aug = as64(rec.outputs[0].logits), as64(s_aug_out.logits), as64(t_engine), as64(t_aug_engine)
    mix = rec.extra_views[AUG][0].mix
    lam, perm = float(mix.weights[0, 0]), mix.perms[1].numpy()
    ce = float(-np_log_softmax(s)[np.arange(len(y)), y].mean())
    ce_mixed = float(-(lam * np_log_softmax(s_aug)[np.arange(len(y)), y]
                       + (1 - lam) * np_log_softmax(s_aug)[np.arange(len(y)), y[perm]]).mean())
    ce_mixed_mag = lam * np_ce_mag(s_aug, y) + (1 - lam) * np_ce_mag(s_aug, y[perm])
    assert terms["ce0"] == f32(0.1 * ce, 0.1 * np_ce_mag(s, y))
    assert terms["kd0"] == f32(0.9 * 1.0 * np_kd(s, t, 4.0), 0.9 * np_kd_mag(s, t, 4.0))
    assert terms["ce_aug0"] == f32(0.9 * 0.5 * ce_mixed, 0.9 * 0.5 * ce_mixed_mag)
    assert terms["kd_aug0"] == f32(0.9 * 2.0 * np_kd(s_aug, t_aug, 4.0), 0.9 * 2.0 * np_kd_mag(s_aug, t_aug, 4.0))
    # the teacher scored exactly the augmented images: their pixels are the CutMix of x by that record
    with torch.no_grad():
        assert close32(teacher([mix.mix_images(x)])[0].logits, t_aug_engine, t_aug_engine.abs().max())
        net.train()
        alone = net(mix.mix_images(x))
    # its own BN batch, not [x; x_aug] (which moves the logits far beyond float32 rounding)
    assert close32(alone, s_aug_out.logits, alone.abs().max())


def test_protocol_trains_with_every_paper_augmentation_and_a_picker_mixer(teacher_dir):
    augs = ["identity", "flip", "crop_flip", "cutout", "mixup", "cutmix", "cutmixpick"]
    augs += ["autoaugment"] if _has("kornia") else []
    for aug in augs:
        tr = kd_trainer(teacher_dir, f"method.extra_aug={aug}")
        b = next(iter(tr.train_loader))
        terms = tr.train_step(b)
        assert set(terms) == {"ce0", "kd0", "kd_aug0"} and all(torch.isfinite(v) for v in terms.values()), aug
        assert all(p.grad is not None for p in tr.cohort.parameters())
        assert all(p.grad is None for p in tr.teacher.parameters())
    tr = kd_trainer(teacher_dir, "method.extra_aug=cutmixpick", "method.extra_aug_args={criterion: kld}")
    assert all(torch.isfinite(v) for v in tr.train_step(next(iter(tr.train_loader))).values())
    tr = kd_trainer(teacher_dir, "mixer=cutmixpick")  # the picker as the run's mixer: CE on its mixed labels
    rec = tr.step_record(next(iter(tr.train_loader)))
    mix = rec.views[0].mix
    z, y = rec.outputs[0].logits.detach().double(), rec.labels
    q = (mix.weights[:, :, None].double() * torch.eye(5, dtype=torch.float64)[y][mix.perms]).sum(0)
    logp = z.log_softmax(1)
    hand, mag = float(-(q * logp).sum(1).mean()), float(((q * logp.abs()).sum(1) + 1 + 2 * z.abs().amax(1)).mean())
    assert float(rec.ce(rec.outputs[0].logits).detach()) == f32(hand, mag)


def test_protocol_resumes_exactly(teacher_dir, tmp_path, monkeypatch):
    aug = "autoaugment" if _has("kornia") else "cutmixpick"  # AutoAugment draws from torch's global RNG
    cfg = load(None, [*BASE, "method=kd", f"method.teacher={teacher_dir}", "peers=1", f"method.extra_aug={aug}",
                      "epochs=2", "data.val_split=0"])
    full = train(cfg, out_dir=tmp_path / "full", echo=False)
    resumed = killed_and_resumed(lambda: cfg, tmp_path / "cut", monkeypatch)
    assert resumed["final"] == full["final"]
    a, b = (load_checkpoint(tmp_path / d)["cohort"] for d in ("full", "cut"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_protocol_bad_options_are_one_line_errors(teacher_dir):
    cases = [({"extra_aug": "cutmx"}, "did you mean"), ({"extra_aug_args": {"length": 2}}, "need method.extra_aug"),
             ({"extra_aug": "cutout", "lw_mix": [1, 1]}, "3 weights"),
             ({"extra_aug": "cutmixpick", "extra_aug_args": {"criterion": "x"}}, "criterion"),
             ({"extra_aug": "cutout", "extra_aug_args": {"lenght": 2}}, "lenght")]
    for kwargs, match in cases:
        with pytest.raises(PeerdistillError, match=match) as e:
            METHODS.build("kd", teacher="t", **kwargs)
        assert "\n" not in str(e.value)
    assert aug_label("cutmixpick", {"criterion": "teacher_entropy", "mix_n_run": 4}) == "cutmixpick:mix_n_run=4"


# ------------------------------------------------------------------ the commands
def test_tstddev_and_correlate_commands_end_to_end(teacher_dir, tmp_path, capsys):
    out = tmp_path / "ts.json"
    argv = ["tstddev", str(teacher_dir), "identity", "flip", "cutmix", "cutmixpick:criterion=teacher_entropy",
            "--epochs", "2", "--batch-size", "8", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["aug"] for r in res["results"]] != [] and {r["aug"] for r in res["results"]} == {
        "identity", "flip", "cutmix", "cutmixpick"}
    assert all(r["groups"] == 4 for r in res["results"])  # 2 epochs x 10 batches of 8 / groups of 5
    ts = [r["t_stddev"] for r in res["results"]]
    assert ts == sorted(ts) and all(v > 0 for v in ts)
    assert "rank" in capsys.readouterr().out
    assert main([*argv[:2], "--epochs", "2", "--batch-size", "8", "--no-progress", "--out", str(out)]) == 0
    paper = {r["aug"]: r for r in json.loads(out.read_text())["results"]}
    assert len(paper) >= 6  # the paper's list without a student
    assert paper["cutout"]["params"] == {"length": 0, "same_on_batch": True}  # every parameter: provenance
    if not _has("scipy"):
        return
    runs = []
    for aug in ("identity", "flip", "cutmix"):
        d = tmp_path / f"s-{aug}"
        train(load(None, [*BASE, "method=kd", f"method.teacher={teacher_dir}", "peers=1", "data.size=48",
                          "data.test_size=64", f"method.extra_aug={aug}"]), out_dir=d, echo=False)
        runs.append(str(d))
    assert main(["correlate", str(out), *runs, "--out", str(tmp_path / "study")]) == 0
    study = json.loads((tmp_path / "study" / "correlation.json").read_text())
    assert len(study["points"]) == 3 and (tmp_path / "study" / "correlation.png").stat().st_size > 0


def _fake_run(d, aug, args, seed, nll):
    d.mkdir(parents=True)
    method = {"name": "kd", "teacher": "t", "extra_aug": aug, **({"extra_aug_args": args} if args else {})}
    (d / "config.yaml").write_text(yaml.safe_dump({"method": method, "model": "resnet8", "peers": 1, "seed": seed}))
    (d / "summary.json").write_text(json.dumps({"epochs": 1, "final": {"test": {"peer0": {"nll": nll, "top1": 50}}}}))
    return str(d)


def test_correlate_on_fake_runs_with_known_correlations(tmp_path, capsys):
    pytest.importorskip("scipy")
    # T. stddev 1, 2, 3, 4 against losses 1, 3, 2, 4 (mean of two seeds at +-0.1):
    # Pearson r = 4 / sqrt(5 * 5) = 0.8, p = 1 - r = 0.2 for n = 4 (t-test with 2 dof);
    # Spearman 1 - 6 * 2 / (4 * 15) = 0.8, exact p = 8 / 24: |rho| >= 0.8 for the identity, the 3 adjacent
    # swaps and their 4 reversals of the 24 orderings (the t approximation's 0.2 is wrong for n = 4);
    # Kendall (5 - 1) / 6 = 2/3, exact p = P(<= 1 or >= 5 inversions) = 8 / 24.
    augs = [("identity", None), ("flip", None), ("cutmix", None), ("cutmixpick", {"criterion": "student_entropy"})]
    labels = ["identity", "flip", "cutmix", "cutmixpick:criterion=student_entropy"]
    ts = {"teacher": "t", "results": [{"aug": a, "t_stddev": float(i + 1)} for i, a in enumerate(labels)]}
    (tmp_path / "ts.json").write_text(json.dumps(ts))
    runs = [_fake_run(tmp_path / f"{i}-{s}", a, args, s, loss + (0.1 if s else -0.1))
            for i, ((a, args), loss) in enumerate(zip(augs, [1.0, 3.0, 2.0, 4.0])) for s in (0, 1)]
    runs.append(_fake_run(tmp_path / "plain", "", None, 0, 9.0))  # plain KD: not in the T. stddev results
    assert main(["correlate", str(tmp_path / "ts.json"), *runs]) == 0
    study = json.loads((tmp_path / "correlation.json").read_text())
    for name, r, p in (("pearson", 0.8, 0.2), ("spearman", 0.8, 1 / 3), ("kendall", 2 / 3, 1 / 3)):
        assert study[name]["r"] == pytest.approx(r, abs=1e-9) and study[name]["p"] == pytest.approx(p, abs=1e-6)
    assert [p["loss"] for p in study["points"]] == pytest.approx([1.0, 3.0, 2.0, 4.0])
    assert all(p["seeds"] == 2 for p in study["points"])
    assert "none" in capsys.readouterr().err  # the plain-KD run is skipped with a note
    assert (tmp_path / "correlation.png").stat().st_size > 0


def test_command_bad_options_are_one_line_errors(teacher_dir, tmp_path, capsys):
    bad = [(["tstddev", str(teacher_dir), "cutmx"], "did you mean"),
           (["tstddev", str(teacher_dir), "cutmixpick:criterion=student_entropy"], "--student"),
           (["tstddev", str(teacher_dir), "--epochs", "0"], "--epochs"),
           (["tstddev", str(teacher_dir), "flip", "--epochs", "1"], "fewer than 2 groups"),
           (["tstddev", str(teacher_dir), "--set", "epochs=3"], "only data."),
           (["tstddev", str(teacher_dir), "cutout:length"], "key=value"),
           (["tstddev", str(tmp_path / "nothing")], "does not exist"),
           (["correlate", str(tmp_path / "missing.json"), str(tmp_path)], "cannot read")]
    (tmp_path / "few.json").write_text(json.dumps({"results": [{"aug": "flip", "t_stddev": 1.0}]}))
    if _has("scipy"):
        bad.append((["correlate", str(tmp_path / "few.json"), _fake_run(tmp_path / "r", "flip", None, 0, 1.0)],
                    "at least 3"))
    for argv, match in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and match in err and "\n" not in err, (argv, err)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_protocol_step_reads_nothing_back_to_the_host(teacher_dir, monkeypatch):
    """As for every method (tests/test_methods.py): on a GPU each host read is a synchronisation. Only
    ``host_values`` (CPU-generator draws) may read; kornia's AutoAugment is the documented exception."""
    for aug in ("identity", "flip", "crop_flip", "cutout", "mixup", "cutmix", "cutmixpick"):
        tr = kd_trainer(teacher_dir, f"method.extra_aug={aug}", "method.lw_mix=[1, 0.5, 1]")
        batch = next(iter(tr.train_loader))
        tr.train_step(batch)
        with no_host_reads(f"a training step with extra_aug={aug}"):
            tr.train_step(batch)


def test_students_sharing_a_view_share_one_augmented_batch(teacher_dir):
    tr = kd_trainer(teacher_dir, "peers=2", "method.extra_aug=cutmix")
    views = tr.method.make_views(next(iter(tr.train_loader)), tr.view_context(torch.Generator().manual_seed(0)))
    aug = views.extra[AUG]
    assert aug.grad and views.peers[0] is views.peers[1] and aug.views[0] is aug.views[1]
    assert len(views.tensors()) == 2  # the teacher runs once on x and once on x_aug
