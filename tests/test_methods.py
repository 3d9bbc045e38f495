"""Methods: every registered method trains through the engine, gradients reach exactly the intended
parameters, the loss maths matches hand-written formulas, mixers keep targets correct, checkpoints
round-trip. Golden values are computed here with plain torch/numpy, never with the library's helpers."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from peerdistill.config import load
from peerdistill.data import mix as mix_mod
from peerdistill.data.mix import MIXERS
from peerdistill.data.views import View
from peerdistill.engine.checkpoint import load_checkpoint, save_atomic
from peerdistill.run import train
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.methods import METHODS, StepRecord
from peerdistill.methods import sd_dropout as sdd_mod
from peerdistill.methods.functional import kd_kl, sigmoid_rampup, soft_ce

from .conftest import no_host_reads
from .reference import (branch, close32, f32, first_batch, has_grad, no_grad, np_ce, np_ce_mag, np_kd, np_kd_mag,
                        np_kl_mag, np_log_softmax, record)

BASE = ["data.name=synthetic", "data.size=64", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=128"]

NEEDS_TEACHER = [m for m in METHODS if "teacher" in METHODS.params(m)]
NO_TEACHER = [m for m in METHODS if m not in NEEDS_TEACHER]


def make_trainer(*overrides: str) -> Trainer:
    return Trainer(load(None, [*BASE, *overrides]), out_dir=None)


def peers_for(name: str) -> int:
    needs = METHODS.build(name).needs
    return needs.peers or max(needs.default_peers, needs.min_peers)


def method_trainer(name: str, teacher: object = None, *extra: str) -> Trainer:
    over = [f"method={name}", f"peers={peers_for(name) if name not in NEEDS_TEACHER else 2}", *extra]
    if name in NEEDS_TEACHER:
        over.append(f"method.teacher={teacher}")
    return make_trainer(*over)


# ------------------------------------------------------------------ hand-written reference maths
def t_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes, batch mean."""
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 1-epoch independent run whose peer 0 serves as the frozen KD teacher."""
    out = tmp_path_factory.mktemp("kd") / "teacher"
    train(load(None, [*BASE, "method=independent", "peers=1"]), out_dir=out, echo=False)
    return out


# ------------------------------------------------------------------ every method trains
@pytest.mark.parametrize("name", NO_TEACHER)
def test_method_trains_and_grads_reach_every_trainable_parameter(name):
    tr = method_trainer(name)
    b = first_batch(tr)
    for _ in range(2):
        terms = tr.train_step(b)
        assert terms and all(torch.isfinite(v) for v in terms.values()), terms
    named = list(tr.module.named_parameters())
    missing = [n for n, p in named if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for _, p in named if p.grad is not None)
    for i in range(len(tr.cohort)):  # each peer actually learns
        assert has_grad(tr.cohort.nets[i].classifier.parameters())
    if tr.ema is not None:  # frozen copies never receive gradients
        assert all(p.grad is None and not p.requires_grad for p in tr.ema.parameters())
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optim for _, p in named if p.requires_grad)


@pytest.mark.numerical
def test_kd_trains_with_frozen_teacher_on_the_mixed_views(teacher_dir):
    tr = make_trainer("method=kd", f"method.teacher={teacher_dir}", "peers=2", "mixer=cutmix", "mixer.prob=1.0")
    teacher = tr.teacher
    ckpt = load_checkpoint(teacher_dir, prefer="best.pt")["cohort"]
    for k, v in teacher.nets[0].state_dict().items():  # the teacher is peer 0 of that run, as saved
        assert torch.equal(v, ckpt[f"nets.0.{k}"]), k
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen: list[StepRecord] = []
    real = tr.method.losses

    def spy(rec: StepRecord):
        seen.append(rec)
        return real(rec)

    tr.method.losses = spy
    b = first_batch(tr)
    steps = [tr.train_step(b) for _ in range(3)]
    assert set(steps[0]) == {"ce0", "kd0", "ce1", "kd1"}
    assert all(torch.isfinite(v) for s in steps for v in s.values())
    # frozen teacher: no gradient, not optimised, bit-identical weights and BN statistics, eval mode
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optim for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(m.training for m in teacher.nets[0].modules())  # BN uses its running statistics
    assert all(p.grad is not None for p in tr.cohort.parameters())
    # the teacher scored exactly the mixed image each student saw; terms match the Good-DA formula
    rec, terms = seen[-1], steps[-1]
    mix = rec.views[0].mix
    assert mix is not None and all(v.mix is mix for v in rec.views)  # one shared draw
    y, perm, lam = rec.labels.numpy(), mix.perms[1].numpy(), float(mix.weights[0, 0])
    for i in range(2):
        with torch.no_grad():
            t_logits = teacher([rec.views[i].x])[0].logits
        assert close32(rec.teacher[i].logits, t_logits, t_logits.abs().max())  # the same images, re-run
        s, t = rec.outputs[i].logits.detach().numpy(), rec.teacher[i].logits.numpy()
        assert float(terms[f"kd{i}"]) == f32(0.9 * np_kd(s, t, 4.0), 0.9 * np_kd_mag(s, t, 4.0))
        ce = lam * np_ce(s, y) + (1 - lam) * np_ce(s, y[perm])
        mag = lam * np_ce_mag(s, y) + (1 - lam) * np_ce_mag(s, y[perm])
        assert float(terms[f"ce{i}"]) == f32(0.1 * ce, 0.1 * mag)


def test_kd_bad_teacher_is_a_one_line_error(teacher_dir):
    with pytest.raises(PeerdistillError) as e:
        METHODS.build("kd")
    assert "teacher" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PeerdistillError, match="not the expected resnet20"):
        make_trainer("method=kd", f"method.teacher={teacher_dir}", "method.teacher_model=resnet20")
    with pytest.raises(PeerdistillError, match="out of range"):
        make_trainer("method=kd", f"method.teacher={teacher_dir}", "method.teacher_peer=3")


# ------------------------------------------------------------------ gradient routing
def test_dml_kl_term_gives_no_gradient_to_the_other_peer():
    tr = make_trainer("method=dml", "peers=2")
    terms = tr.method.losses(record(tr))
    terms["kl0"].backward()
    assert has_grad(tr.cohort.nets[0].parameters())
    assert no_grad(tr.cohort.nets[1].parameters())


def test_one_gate_gets_gradient_from_ce_gated_only():
    tr = make_trainer("method=one", "peers=3")
    gate = list(tr.method.parameters())
    assert gate and tr.taps == (tr.cohort.nets[0].stage_names[tr.cohort.shared - 1],)
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optim for p in gate)
    terms = tr.method.losses(record(tr))
    assert set(terms) == {"ce0", "ce1", "ce2", "ce_gated", "kl0", "kl1", "kl2"}
    terms["kl0"].backward(retain_graph=True)
    assert no_grad(gate)  # sg(z_e): the KD terms never reach the gate ...
    assert has_grad(branch(tr, 0))  # ... they train branch 0 ...
    assert no_grad(branch(tr, 1)) and no_grad(branch(tr, 2))  # ... and no other branch
    tr.optimizer.zero_grad(set_to_none=True)
    terms["ce_gated"].backward()
    assert has_grad(gate) and has_grad(branch(tr, 2))


@pytest.fixture(scope="module")
def sdd_trainer():
    return make_trainer("method=sd_dropout", "peers=1")


@pytest.mark.numerical
@pytest.mark.parametrize("variant,detach", [("both", False), ("both", True), ("forward", False),
                                            ("reverse", False)])
def test_sd_dropout_gradient_reaches_the_intended_dropped_branches(sdd_trainer, variant, detach):
    tr, t = sdd_trainer, 3.0
    tr.method.variant, tr.method.detach = variant, detach
    tr.optimizer.zero_grad(set_to_none=True)
    rec = record(tr)
    captured: list[torch.Tensor] = []

    def hook(_module, _inp, out):
        out.retain_grad()
        captured.append(out)

    handle = rec.heads[0].register_forward_hook(hook)
    try:
        terms = tr.method.losses(rec)
    finally:
        handle.remove()
    assert len(captured) == 2  # z_u, z_v through the same classifier
    z_u, z_v = captured
    terms["sdd0"].backward()
    # expected gradients: hand-written KLs on leaf copies, stop-gradients placed by the definition
    u, v = (z.detach().clone().requires_grad_(True) for z in (z_u, z_v))
    lu, lv = torch.log_softmax(u / t, 1), torch.log_softmax(v / t, 1)
    if variant == "both":
        su, sv = (lu.detach(), lv.detach()) if detach else (lu, lv)
        loss = t_kl(su, lv) + t_kl(sv, lu)  # KL(p_u || p_v) + KL(p_v || p_u), targets first
    elif variant == "forward":
        loss = t_kl(lv.detach(), lu)
    else:
        loss = t_kl(lu, lv.detach())
    gu, gv = torch.autograd.grad(t * t * loss, (u, v), allow_unused=True, retain_graph=True)
    # d/dz of T^2 KL, batch mean, is T (p - q) / B per element and per KL: a difference of probabilities
    mag = 2 * t * (lu.exp() + lv.exp()).detach() / len(u)
    assert close32(z_u.grad, gu, mag)
    if gv is None or not gv.any():
        assert z_v.grad is None or not z_v.grad.any()
    else:
        assert close32(z_v.grad, gv, mag)
    if variant == "both":  # both samples learn; the detached and undetached gradients really differ
        assert z_u.grad.abs().sum() > 0 and z_v.grad.abs().sum() > 0
        other = t_kl(lu, lv) + t_kl(lv, lu) if detach else t_kl(lu.detach(), lv) + t_kl(lv.detach(), lu)
        g_other = torch.autograd.grad(t * t * other, u)[0]
        assert not torch.allclose(g_other, gu, atol=1e-7, rtol=1e-3)
    assert has_grad(tr.cohort.nets[0].classifier.parameters())


# ------------------------------------------------------------------ golden values
@pytest.mark.numerical
def test_kd_kl_soft_ce_and_rampup_match_hand_formulas():
    # float64 in, float64 out: the formulas are checked to float64 precision, on any CPU
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(8, 7, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    for temp in (1.0, 4.0):
        assert float(kd_kl(s, t, temp)) == pytest.approx(np_kd(s.numpy(), t.numpy(), temp), rel=1e-12)
    w = torch.rand(8, generator=g, dtype=torch.float64)
    lt, ls = np_log_softmax(t.numpy() / 2), np_log_softmax(s.numpy() / 2)
    weighted = 4 * ((np.exp(lt) * (lt - ls)).sum(1) * w.numpy()).sum() / 8
    assert float(kd_kl(s, t, 2.0, weights=w)) == pytest.approx(weighted, rel=1e-12)
    q = torch.softmax(torch.randn(8, 7, generator=g, dtype=torch.float64), 1)
    hand = float(-(q.numpy() * np_log_softmax(s.numpy())).sum(1).mean())
    assert float(soft_ce(s, q)) == pytest.approx(hand, rel=1e-12)
    # float32 in: float32 out, within float32 rounding of what the KL cancels
    s32, t32 = s.float(), t.float()
    assert kd_kl(s32, t32, 4.0).dtype == torch.float32
    sn, tn = s32.numpy(), t32.numpy()
    assert float(kd_kl(s32, t32, 4.0)) == f32(np_kd(sn, tn, 4.0), np_kd_mag(sn, tn, 4.0))
    for e, expected in [(0, math.exp(-5)), (40, math.exp(-5 * 0.25)), (80, 1.0), (100, 1.0)]:
        assert sigmoid_rampup(e, 80) == pytest.approx(expected, rel=1e-12)
    assert sigmoid_rampup(40, 80, scale=0.1) == pytest.approx(0.1 * math.exp(-1.25), rel=1e-12)


@pytest.mark.numerical
def test_sd_dropout_loss_equals_hand_computed_value(monkeypatch):
    tr = make_trainer("method=sd_dropout", "peers=1", "method.beta=0.3", "method.temperature=2.5",
                      "method.lam=0.7")
    rec = record(tr)
    f = rec.outputs[0].embedding.detach()
    g = torch.Generator().manual_seed(1)
    masks = [(torch.rand(f.shape, generator=g) > 0.3).float() for _ in range(2)]
    calls: list[tuple[float, bool]] = []

    def fake_dropout(x, p=0.5, training=True, inplace=False):
        calls.append((p, training))
        return x * masks[len(calls) - 1] / (1 - p)  # inverted dropout with a known mask

    monkeypatch.setattr(sdd_mod.F, "dropout", fake_dropout)
    terms = tr.method.losses(rec)
    assert calls == [(0.3, True), (0.3, True)]
    net = tr.cohort.nets[0].classifier
    w, b, f = net.weight.detach().double(), net.bias.detach().double(), f.double()  # the reference in float64
    z, zu, zv = (x @ w.T + b for x in (f, f * masks[0] / 0.7, f * masks[1] / 0.7))
    y, t = rec.labels, 2.5
    ce = -torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean()
    lu, lv = torch.log_softmax(zu / t, 1), torch.log_softmax(zv / t, 1)
    expected = ce + 0.7 * t * t * (t_kl(lu, lv) + t_kl(lv, lu))  # lam * T^2 * (KL_uv + KL_vu), not T^4
    zn, un, vn, yn = z.numpy(), zu.numpy(), zv.numpy(), y.numpy()
    # The library's float32 logits are rounded within |w| |f| + |b| (their terms' size); the loss moves by at
    # most 2 per unit of logit error through the CE and 8 T through the two T^2-scaled KLs.
    logit_mag = float((f.abs() @ w.abs().T + b.abs()).max())
    mag = (np_ce_mag(zn, yn) + 0.7 * (np_kl_mag(vn, lu.exp().numpy(), t) + np_kl_mag(un, lv.exp().numpy(), t))
           + (2 + 0.7 * 8 * t) * logit_mag)
    assert float((terms["ce0"] + terms["sdd0"]).detach()) == f32(float(expected), mag)


@pytest.mark.numerical
def test_one_gated_logits_and_rampup():
    tr = make_trainer("method=one", "peers=3")
    m = tr.method
    rec = record(tr)
    fmap = rec.outputs[0].maps[m.tap]
    assert all(o.maps[m.tap] is fmap for o in rec.outputs)  # one shared trunk feature
    gap = fmap.detach().double().mean((2, 3))  # the reference in float64
    w_fc, b_fc = m.gate_fc.weight.detach().double(), m.gate_fc.bias.detach().double()
    gamma, beta = m.gate_bn.weight.detach().double(), m.gate_bn.bias.detach().double()
    y = gap @ w_fc.T + b_fc
    zs = [o.logits.detach().double() for o in rec.outputs]

    def hand(bn_mean, bn_var):
        sd = torch.sqrt(bn_var.double() + m.gate_bn.eps)
        a = (y - bn_mean.double()) / sd * gamma + beta
        gates = torch.softmax(torch.relu(a), 1)
        # float32 rounds the gate input within the size of its terms; a gate error moves z_e by at most
        # 2 max|z| (softmax Jacobian), and z_e = sum g_i z_i itself rounds within max|z|
        a_mag = (gap.abs() @ w_fc.abs().T + b_fc.abs() + bn_mean.double().abs()) / sd * gamma.abs() + beta.abs()
        z_max = torch.stack(zs).abs().amax((0, 2))[:, None]  # (B, 1)
        return sum(gates[:, i:i + 1] * zs[i] for i in range(3)), z_max * (1 + 6 * a_mag.amax(1, keepdim=True))

    z_e, z_mag = hand(y.mean(0), y.var(0, unbiased=False))  # train mode: batch statistics
    assert close32(m.gated(rec.outputs), z_e, z_mag)
    terms = {k: v.detach() for k, v in m.losses(rec).items()}
    zn, yn = z_e.numpy(), rec.labels.numpy()
    assert float(terms["ce_gated"]) == f32(np_ce(zn, yn), np_ce_mag(zn, yn) + 2 * float(z_mag.max()))
    m.rampup_epochs = 80.0
    ramped = {k: v.detach() for k, v in m.losses(dataclasses.replace(rec, epoch=40)).items()}
    m.rampup_epochs = 0.0
    assert float(ramped["kl1"]) == pytest.approx(math.exp(-1.25) * float(terms["kl1"]), rel=1e-4)
    m.eval()
    heads = m.eval_heads(rec.outputs)
    assert {"peer0", "peer1", "peer2", "ensemble", "gated"} <= set(heads)
    assert close32(heads["gated"], *hand(m.gate_bn.running_mean, m.gate_bn.running_var))


def test_one_split_after_moves_the_gate():
    tr = make_trainer("method=one", "method.split_after=stage1")
    assert tr.cohort.shared == 1 and tr.taps == ("stage1",)
    assert tr.method.gate_fc.in_features == 16  # resnet8's first stage width
    assert all(torch.isfinite(v) for v in tr.train_step(first_batch(tr)).values())


# ------------------------------------------------------------------ mixers
def mixed(name: str, **kw):
    mixer = MIXERS.build(name, **kw)
    b, h = 6, 16
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, h).contiguous()
    xm, rec = mixer(x, torch.Generator().manual_seed(3))
    return x, xm, rec


@pytest.mark.numerical
@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixed_ce_and_pixel_fractions_match_the_label_weights(name):
    x, xm, mrec = mixed(name, prob=1.0, derangement=True)
    assert mrec is not None
    lam, perm = mrec.weights[0], mrec.perms[1]
    assert torch.allclose(mrec.weights.sum(0), torch.ones(6))
    if name == "mixup":
        assert torch.allclose(xm, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm])
    else:
        for i in range(6):
            own = (xm[i] == x[i]).float().mean()
            other = (xm[i] == x[perm[i]]).float().mean()
            assert float(own) == pytest.approx(float(lam[i]), abs=1e-6)
            assert float(other) == pytest.approx(1 - float(lam[i]), abs=1e-6)
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    rec = StepRecord([View(xm, y, torch.arange(6), mrec)], [], [], 5)
    lam0 = float(lam[0])
    z = logits.numpy()
    y2 = y.numpy()[perm.numpy()]
    expected = lam0 * np_ce(z, y.numpy()) + (1 - lam0) * np_ce(z, y2)
    assert float(rec.ce(logits)) == f32(expected, lam0 * np_ce_mag(z, y.numpy()) + (1 - lam0) * np_ce_mag(z, y2))


def test_cutmix_box_clipped_at_the_border_gives_lambda_from_the_clipped_area(monkeypatch):
    monkeypatch.setattr(mix_mod, "beta", lambda alpha, gen: 0.19)  # side ratio 0.9: a 14x14 box in 16x16
    for seed in range(50):
        mixer = MIXERS.build("cutmix", prob=1.0, derangement=True)
        x = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
        xm, rec = mixer(x, torch.Generator().manual_seed(seed))
        pasted = int((xm[0, 0] != x[0, 0]).sum())
        if pasted < 14 * 14:
            break
    else:
        pytest.fail("no clipped box in 50 draws")
    lam = float(rec.weights[0, 0])
    assert lam == pytest.approx(1 - pasted / 256, abs=1e-6)
    assert abs(lam - 0.19) > 0.05  # the nominal lambda would be wrong for a clipped box


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", list(METHODS))
def test_checkpoint_round_trip(name, tmp_path, request):
    teacher = request.getfixturevalue("teacher_dir") if name in NEEDS_TEACHER else None
    tr = method_trainer(name, teacher)
    tr.train_step(first_batch(tr))
    path = tmp_path / "ckpt.pt"
    save_atomic(tr.state(), path)
    tr2 = method_trainer(name, teacher, "seed=1")
    src = {**{f"c.{k}": v for k, v in tr.cohort.state_dict().items()},
           **{f"m.{k}": v for k, v in tr.method.state_dict().items()}}

    def dst() -> dict[str, torch.Tensor]:
        return {**{f"c.{k}": v for k, v in tr2.cohort.state_dict().items()},
                **{f"m.{k}": v for k, v in tr2.method.state_dict().items()}}

    assert set(dst()) == set(src)
    assert any(not torch.equal(v, src[k]) for k, v in dst().items())  # the test can fail
    tr2.load(path)
    after = dst()
    assert all(torch.equal(v, src[k]) for k, v in after.items()), [k for k, v in after.items()
                                                                   if not torch.equal(v, src[k])]
    assert tr2.step == tr.step == 1
    if name == "one":
        assert {"m.gate_fc.weight", "m.gate_bn.running_mean"} <= set(src)


# ------------------------------------------------------------------ no host reads inside a step
@pytest.mark.parametrize("name", list(METHODS))
def test_training_step_never_reads_a_tensor_back_to_the_host(name, teacher_dir, monkeypatch):
    """On a GPU every such read is a device synchronisation; the step must have none (DESIGN §7), so a
    step runs with every Python-level tensor-to-host read turned into an error. The one exception is
    ``host_values``, which reads CPU-generator draws and refuses device tensors."""
    tr = method_trainer(name, teacher_dir, "mixer=cutmix", "mixer.prob=0.5")
    batch = first_batch(tr)
    tr.train_step(batch)  # first step outside the guard: lazy initialisation may inspect values
    with no_host_reads():
        for _ in range(4):  # with prob 0.5, some steps mix and some do not
            tr.train_step(batch)
