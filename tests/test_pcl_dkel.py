"""PCL and DKEL: loss maths against hand formulas, gradient routing, ramp-up and decaying-ensemble values,
the DKEL teacher initialisation under both EMA schedules, exact resume, listing and bad values.

Golden values are computed here with numpy, never with the library's helpers."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from peerdistill.cli import main
from peerdistill.config import load
from peerdistill.data.views import View
from peerdistill import run as run_mod
from peerdistill.engine.ema import EMA
from peerdistill.engine.trainer import Trainer
from peerdistill.methods import METHODS, DataInfo, PeerOutput, StepRecord
from peerdistill.methods.pcl import code_rampup
from peerdistill.models.cohort import build_cohort

from .conftest import killed_and_resumed
from .reference import branch, close32, f32, has_grad, no_grad, np_ce, np_ce_mag, np_kd, np_kd_mag, record

BASE = ["data.name=synthetic", "data.size=64", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=128", "data.test_size=32", "threads=1"]
# The resume runs: 3 steps per epoch, no validation split, 8x8 images.
RESUME = [*BASE, "data.size=48", "data.image_size=8", "data.test_size=16", "data.val_split=0", "epochs=2"]
K, B, D, M = 5, 4, 3, 3  # classes, batch, embedding width, branches of the tiny-tensor tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def make_trainer(*overrides: str) -> Trainer:
    return Trainer(load(None, [*BASE, *overrides]), out_dir=None)


def trunk(tr: Trainer) -> list[nn.Parameter]:
    net = tr.cohort.nets[0]
    return list(net.stem.parameters()) + [p for s in net.stages[:tr.cohort.shared] for p in s.parameters()]


# ------------------------------------------------------------------ hand-written reference maths
def sigmoid(e: float, scale: float, length: float = 80.0) -> float:
    phase = 1.0 - min(max(e, 0.0), length) / length
    return scale * math.exp(-5.0 * phase * phase)


# ------------------------------------------------------------------ golden values on tiny tensors
def tiny_record(epoch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(B, K, generator=g) * 2 for _ in range(M)]
    f = [torch.randn(B, D, generator=g) for _ in range(M)]
    zbar = [torch.randn(B, K, generator=g) * 2 for _ in range(M)]
    y = torch.tensor([0, 3, 1, 4])
    view = View(torch.zeros(B, 1, 2, 2), y, torch.arange(B))
    rec = StepRecord([view] * M, [PeerOutput(z[i], f[i]) for i in range(M)], [], K,
                     ema=[PeerOutput(zbar[i], f[i]) for i in range(M)], epoch=epoch)
    as64 = lambda ts: [t.double().numpy() for t in ts]  # noqa: E731  the reference in float64
    return rec, as64(z), np.concatenate(as64(f), 1), as64(zbar), y.numpy()


def tiny_method(name: str, *args: str):
    cfg = load(None, [f"method={name}", *args])
    method = METHODS.build(name, **cfg.method.args)
    method.ensemble_fc = nn.Linear(M * D, K)
    with torch.no_grad():
        method.ensemble_fc.weight.copy_(torch.linspace(-1, 1, K * M * D).view(K, M * D))
        method.ensemble_fc.bias.copy_(torch.arange(K, dtype=torch.float) / 10)
    method.num_classes = K
    return method, method.ensemble_fc.weight.detach().double().numpy(), method.ensemble_fc.bias.detach().double().numpy()


def ensemble_teacher(f: np.ndarray, w_fc: np.ndarray, b_fc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z_e = FC([f_0, f_1, f_2]) in float64, and the size of its terms (float32 rounds each logit within it)."""
    return f @ w_fc.T + b_fc, np.abs(f) @ np.abs(w_fc).T + np.abs(b_fc)


def ce_mag_through(z: np.ndarray, y: np.ndarray, z_mag: np.ndarray) -> float:
    """CE magnitude when the library's logits themselves round within ``z_mag``: a CE moves by 2 per unit."""
    return np_ce_mag(z, y) + 2 * float(z_mag.max(1).mean())


@pytest.mark.numerical
@pytest.mark.parametrize("epoch", [0, 1, 40, 100])
@pytest.mark.parametrize("rampup", ["correct", "code"])
def test_pcl_terms_equal_hand_formulas(epoch, rampup):
    method, w_fc, b_fc = tiny_method("pcl", f"method.rampup={rampup}")
    rec, z, f, zbar, y = tiny_record(epoch)
    terms = {k: float(v.detach()) for k, v in method.losses(rec).items()}
    assert set(terms) == {"ce_ens", *(f"{n}{i}" for n in ("ce", "kd_ens", "kd_mean") for i in range(M))}
    z_e, ze_mag = ensemble_teacher(f, w_fc, b_fc)  # the ensemble classifier on [f_0, f_1, f_2]
    if rampup == "correct":
        w = math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2)
    else:  # the released code: lambd * exp(-5 (1 - epoch / lambd)^2) up to epoch 80, lambd = 1
        w = {0: math.exp(-5), 1: 1.0, 40: math.exp(-5 * 39 ** 2), 100: 1.0}[epoch]
    assert terms["ce_ens"] == f32(np_ce(z_e, y), ce_mag_through(z_e, y, ze_mag))
    for i in range(M):
        assert terms[f"ce{i}"] == f32(np_ce(z[i], y), np_ce_mag(z[i], y))
        assert terms[f"kd_ens{i}"] == f32(w * np_kd(z[i], z_e, 3.0), w * np_kd_mag(z[i], z_e, 3.0, teacher_mag=ze_mag))
        pm, pm_mag = (sum(fn(z[i], zbar[j], 3.0) for j in range(M) if j != i) / (M - 1) for fn in (np_kd, np_kd_mag))
        assert terms[f"kd_mean{i}"] == f32(w * pm, w * pm_mag)


@pytest.mark.numerical
@pytest.mark.parametrize("epoch", [0, 4, 9, 10, 100])
@pytest.mark.parametrize("k", [0.5, 0.0])
def test_dkel_terms_equal_hand_formulas(epoch, k):
    method, w_fc, b_fc = tiny_method("dkel", f"method.ensemble_decay={k}")
    rec, z, f, zbar, y = tiny_record(epoch, seed=1)
    terms = {n: float(v.detach()) for n, v in method.losses(rec).items()}
    names = ("ce", "kd_ens", "kd_mean", "kd_mean_ens")
    assert set(terms) == {"ce_ens", *(f"{n}{i}" for n in names for i in range(M))}
    r = 0.1 * math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2)  # lambda = 0.1
    w_ens = math.exp(-k * epoch)
    w_ens = w_ens if w_ens > 0.01 else 0.0
    z_e, ze_mag = ensemble_teacher(f, w_fc, b_fc)
    assert terms["ce_ens"] == f32(np_ce(z_e, y), ce_mag_through(z_e, y, ze_mag))
    for i in range(M):
        others = [zbar[j] for j in range(M) if j != i]
        assert terms[f"ce{i}"] == f32(np_ce(z[i], y), np_ce_mag(z[i], y))
        assert terms[f"kd_ens{i}"] == f32(r * np_kd(z[i], z_e, 3.0), r * np_kd_mag(z[i], z_e, 3.0, teacher_mag=ze_mag))
        individual, ind_mag = (sum(fn(z[i], t, 3.0) for t in others) / (M - 1) for fn in (np_kd, np_kd_mag))
        assert terms[f"kd_mean{i}"] == f32(r * (1 - w_ens) * individual, r * (1 - w_ens) * ind_mag)
        mean = (others[0] + others[1]) / 2  # the mean of the other teachers' logits
        ens_mag = np_kd_mag(z[i], mean, 3.0, teacher_mag=(np.abs(others[0]) + np.abs(others[1])) / 2)
        assert terms[f"kd_mean_ens{i}"] == f32(r * w_ens * np_kd(z[i], mean, 3.0), r * w_ens * ens_mag)
    if k == 0.5 and epoch >= 10:
        assert all(terms[f"kd_mean_ens{i}"] == 0 for i in range(M))


def test_rampup_and_decaying_ensemble_values():
    pcl, dkel = METHODS.build("pcl"), METHODS.build("dkel")
    for e in (0, 1, 20, 40, 79, 80, 81, 200):
        assert pcl.rampup_weight(e) == pytest.approx(sigmoid(e, 1.0), rel=1e-12)
        assert dkel.rampup_weight(e) == pytest.approx(sigmoid(e, 0.1), rel=1e-12)
    # The released code (lambd = 1): e^-5, 1, e^-5, ~0 up to epoch 80 included, 1 afterwards.
    code = METHODS.build("pcl", rampup="code")
    expected = {0: math.exp(-5), 1: 1.0, 2: math.exp(-5), 3: math.exp(-20), 80: 0.0, 81: 1.0, 150: 1.0}
    for e, v in expected.items():
        assert code.rampup_weight(e) == pytest.approx(v, rel=1e-12, abs=1e-300)
    assert code_rampup(40, 80, 1.0) == math.exp(-5 * 39 ** 2)
    # DKEL with the bug (lambd = 0.1): r(0) = 0.1 e^-5, then r(e) <= 0.1 e^-405 for every epoch 1..80.
    dcode = METHODS.build("dkel", rampup="code")
    assert dcode.rampup_weight(0) == pytest.approx(0.1 * math.exp(-5), rel=1e-12)
    assert max(dcode.rampup_weight(e) for e in range(1, 81)) <= 0.1 * math.exp(-405) * (1 + 1e-9)
    assert dcode.rampup_weight(81) == pytest.approx(0.1)
    assert METHODS.build("pcl", rampup="code", weight=0.0).rampup_weight(3) == 0.0
    # w_ens = exp(-0.5 e): active for epochs 0..9 (e^-4.5 = 0.011), 0 from epoch 10 (e^-5 < 0.01).
    assert [dkel.ensemble_weight(e) for e in (0, 1, 9)] == pytest.approx([1.0, math.exp(-0.5), math.exp(-4.5)])
    assert all(dkel.ensemble_weight(e) == 0.0 for e in range(10, 300))
    assert METHODS.build("dkel", ensemble_decay=0.1).ensemble_weight(40) == pytest.approx(math.exp(-4.0))


# ------------------------------------------------------------------ the engine's pieces
@pytest.fixture(scope="module")
def pcl_trainer():
    return make_trainer("method=pcl")


@pytest.mark.numerical
def test_pcl_cohort_views_and_ema_outputs(pcl_trainer):
    tr = pcl_trainer
    assert len(tr.cohort) == 3 and tr.cohort.shared == 2 and tr.ema.warmup == "meanteacher"
    assert tr.method.ensemble_fc.in_features == 3 * 64 and tr.ema.buffer_mode == "own"
    rec = record(tr)
    assert not torch.equal(rec.views[0].x, rec.views[1].x) and not torch.equal(rec.views[1].x, rec.views[2].x)
    teacher = copy.deepcopy(tr.ema.module).train()  # train mode: batch statistics, as the engine ran it
    with torch.no_grad():
        outs = teacher([v.x for v in rec.views])
    for j in range(3):  # rec.ema[j] is the EMA's branch j on view j: the same computation re-run
        assert close32(rec.ema[j].logits, outs[j].logits, outs[j].logits.abs().max())
    emb, fc = torch.cat([o.embedding for o in rec.outputs], 1).detach().double(), tr.method.ensemble_fc
    w_fc, b_fc = fc.weight.detach().double(), fc.bias.detach().double()
    assert close32(tr.method.ensemble_logits(rec.outputs), emb @ w_fc.T + b_fc, emb.abs() @ w_fc.abs().T + b_fc.abs())
    heads = tr.evaluate(tr.data.test)
    assert {"peer0", "peer1", "peer2", "ensemble", "ema0", "ema1", "ema2", "ens_teacher"} <= set(heads)


@pytest.mark.parametrize("name", ["pcl", "dkel"])
def test_branch_classifiers_start_independent_or_as_the_codes_copies(name):
    """The PCL / DKEL code deep-copies branch 1 and re-initialises only its convolutions, so the branches'
    classifiers start identical: ``classifier_init=copy``; the default initialises each on its own."""
    def classifiers(*over):
        tr = make_trainer(f"method={name}", *over)
        return ([n.classifier.state_dict() for n in tr.cohort.nets],
                [n.classifier.state_dict() for n in tr.ema.module.nets])

    own, _ = classifiers()
    assert not torch.equal(own[0]["weight"], own[1]["weight"])
    copied, ema = classifiers("method.classifier_init=copy")
    for c in (*copied[1:], *ema):  # the EMA copy is taken after the method set the cohort up
        assert all(torch.equal(c[k], copied[0][k]) for k in ("weight", "bias"))


def test_pcl_gradient_routing(pcl_trainer):
    tr = pcl_trainer
    fc = list(tr.method.ensemble_fc.parameters())
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optim for p in fc) and not any(id(p) in in_optim for p in tr.ema.parameters())
    terms = tr.method.losses(record(tr, epoch=100))  # w = 1
    for name, owner in (("kd_ens0", 0), ("kd_mean1", 1), ("ce2", 2)):
        tr.optimizer.zero_grad(set_to_none=True)
        terms[name].backward(retain_graph=True)
        assert no_grad(fc), name  # sg(z_e): only CE(z_e) trains the ensemble classifier
        assert has_grad(branch(tr, owner)) and has_grad(trunk(tr)), name
        assert all(no_grad(branch(tr, j)) for j in range(3) if j != owner), name
    tr.optimizer.zero_grad(set_to_none=True)
    terms["ce_ens"].backward()
    assert has_grad(fc) and has_grad(trunk(tr)) and all(has_grad(branch(tr, j)) for j in range(3))
    assert all(p.grad is None and not p.requires_grad for p in tr.ema.parameters())  # the EMA never learns
    tr.optimizer.zero_grad(set_to_none=True)


def test_shared_mix_mixes_every_branch_view_alike():
    tr = make_trainer("method=pcl", "mixer=cutmix", "mixer.prob=1.0")
    rec = record(tr)
    assert rec.views[0].mix is not None and all(v.mix is rec.views[0].mix for v in rec.views)
    assert not torch.equal(rec.views[0].x, rec.views[1].x)  # still independent crops underneath
    assert all(torch.isfinite(v) for v in tr.train_step(next(iter(tr.train_loader))).values())


@pytest.mark.parametrize("name", ["pcl", "dkel"])
@pytest.mark.parametrize("model", ["resnet32", "resnet110", "vgg16", "densenet40_12", "wrn_20_8"])
def test_builds_with_the_table_architectures(name, model):
    method = METHODS.build(name)
    needs = method.needs
    cohort = build_cohort([model], needs.default_peers, 100, 3, {}, needs.topology, needs.split_after)
    method.setup(cohort, DataInfo(100, 10, torch.zeros(10, dtype=torch.long), 3, (32, 32)))
    net = cohort.nets[0]
    assert len(cohort) == 3 and cohort.shared == len(net.stage_names) - 1
    assert cohort.nets[1].stem is net.stem and cohort.nets[1].stages[-1] is not net.stages[-1]
    assert (method.ensemble_fc.in_features, method.ensemble_fc.out_features) == (3 * net.num_features, 100)


# ------------------------------------------------------------------ DKEL: the teacher initialisation
def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_dkel_initialisation_takes_init_plus_one_steps_and_only_moves_the_teacher():
    tr = make_trainer("method=dkel", "method.init=2")
    student0, teacher0 = params(tr.cohort), params(tr.ema.module)
    assert all(torch.equal(a, b) for a, b in zip(student0, teacher0))  # the teacher starts as a copy
    tracked = tr.ema.module.nets[0].stages[-1]  # a branch BN counts one forward per init step
    bn = next(m for m in tracked.modules() if isinstance(m, nn.BatchNorm2d))
    tr.before_training()
    assert int(bn.num_batches_tracked) == 3 and int(tr.method.init_steps) == 3
    assert all(torch.equal(a, b) for a, b in zip(student0, params(tr.cohort)))
    assert all(not torch.equal(a, b) for a, b in zip(teacher0, params(tr.ema.module)) if a.dim() > 1)
    assert all(p.grad is None and not p.requires_grad for p in tr.ema.parameters())
    off = make_trainer("method=dkel", "method.teacher_init=false")
    off.before_training()
    assert int(off.method.init_steps) == 0 and all(torch.equal(a, b) for a, b in zip(student0, params(off.ema.module)))


@pytest.mark.numerical
def test_dkel_initialisation_survives_under_fixed_and_is_erased_under_meanteacher():
    tr = make_trainer("method=dkel")
    tr.before_training()
    t0 = params(tr.ema.module)
    batch = next(iter(tr.train_loader))
    students = []
    for _ in range(3):
        tr.train_step(batch)
        students.append(params(tr.cohort))
    a = 0.999
    for k, p in enumerate(tr.ema.module.parameters()):  # theta'_3 = a^3 theta'_0 + sum_t (1-a) a^(3-t) theta_t
        parts = [a ** 3 * t0[k].double(), *((1 - a) * a ** (3 - t) * students[t - 1][k].double() for t in (1, 2, 3))]
        assert close32(p, sum(parts), 3 * sum(q.abs() for q in parts))  # three float32 updates
    assert any(not torch.equal(p, s) for p, s in zip(tr.ema.module.parameters(), tr.cohort.parameters()))
    mt = make_trainer("method=dkel", "method.ema_schedule=meanteacher")
    mt.before_training()
    mt.train_step(next(iter(mt.train_loader)))
    assert all(torch.equal(p, s) for p, s in zip(mt.ema.module.parameters(), mt.cohort.parameters()))
    ema_bn = [b for n, b in mt.ema.module.named_buffers() if n.endswith("running_mean")]
    student_bn = [b for n, b in mt.cohort.named_buffers() if n.endswith("running_mean")]
    assert any(not torch.allclose(x, y) for x, y in zip(ema_bn, student_bn))  # only the BN statistics keep a trace


@pytest.mark.numerical
@pytest.mark.parametrize("schedule", ["fixed", "meanteacher"])
def test_dkel_schedule_keeps_the_initial_offset_as_decay_to_the_t(schedule):
    """Two EMAs of one moving source whose starting points differ by delta: under ``fixed`` the gap is
    exactly 0.999^t delta (the initialisation fades slowly); under ``meanteacher`` it is gone after one step."""
    warmup = METHODS.build("dkel", ema_schedule=schedule).needs.ema_warmup
    source = nn.Linear(4, 3)
    plain, moved = EMA(source, 0.999, warmup, "own"), EMA(source, 0.999, warmup, "own")
    delta = [torch.randn_like(p) for p in moved.parameters()]
    with torch.no_grad():
        for p, d in zip(moved.parameters(), delta):
            p.add_(d)
    for t in range(1, 6):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(0.1 * torch.randn_like(p))
        plain.update(source)
        moved.update(source)
        factor = 0.999 ** t if schedule == "fixed" else 0.0
        for p, q, d in zip(moved.parameters(), plain.parameters(), delta):  # a difference of t updated copies
            assert close32(p - q, factor * d.double(), t * (p.abs() + q.abs()).detach())


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("name,extra", [("pcl", ["mixer=cutmix", "mixer.prob=0.5"]), ("dkel", [])])
def test_resume_after_kill_matches_uninterrupted(name, extra, tmp_path, monkeypatch):
    over = [*RESUME, f"method={name}", *extra]
    for plot in ("plot_history", "plot_reliability"):  # not what this test is about, and slow
        monkeypatch.setattr(run_mod, plot, lambda *a, **k: None)
    full = run_mod.train(load(None, over), tmp_path / "full", echo=False)
    resumed = killed_and_resumed(lambda: load(None, over), tmp_path / "cut", monkeypatch)
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    for part in ("cohort", "method", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert {"ensemble_fc.weight", "ensemble_fc.bias"} <= set(a["method"])
    if name == "dkel":
        assert int(b["method"]["init_steps"]) == 2 and b["prepared"]  # ran once, not repeated on resume
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and "kd_mean0" in lines[-1]["loss"]


# ------------------------------------------------------------------ command line
def test_list_shows_both_methods_with_their_parameters(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name, expected in (("pcl", ("temperature=3.0", "rampup='correct'",
                                     "ema_schedule='meanteacher'")),
                           ("dkel", ("weight=0.1", "ensemble_decay=0.5", "init=1", "ema_schedule='fixed'"))):
        at = next(i for i, line in enumerate(out) if line.split()[:1] == [name])
        assert len(out[at]) > 40 and all(e in out[at + 1] for e in expected), out[at:at + 2]


@pytest.mark.parametrize("override,expected", [
    ("method.ensemble_decay=-0.5", "parameter 'ensemble_decay' of method 'dkel' must be float >= 0"),
    ("peers=1", "method 'dkel' needs at least 2 peers, got 1"),
    ("method.mix=per_view", "method 'dkel' needs mix=shared"),
    ("method.ema_schedule=ramp", "parameter 'ema_schedule' of method 'dkel' must be one of fixed, meanteacher"),
])
def test_bad_values_are_one_line_errors(capsys, tmp_path, override, expected):
    out = tmp_path / "r"
    code = main(["train", "--out", str(out), *BASE, "method=dkel", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not out.exists()
    if override == "method.mix=per_view":
        assert main(["train", "--out", str(out), *BASE, "method=pcl", override]) == 2
        assert "method 'pcl' needs mix=shared" in capsys.readouterr().err
