"""Self-distillation family: CS-KD, DDGSD, BYOT, Tf-KD_reg, PS-KD, SD-Dropout v2 and the SD-Dropout add-on.

Golden values are written out here in plain torch (log-softmax, KL, CE by hand), never with the
library's helpers, in float64: the engine's record and the method's modules are moved to float64
(``reference.as_float64``), so the formulas are checked to float64 precision on any CPU. Gradient routing
is checked parameter by parameter; PS-KD's store survives resume.
"""
from __future__ import annotations

import copy

import pytest
import torch

from peerdistill.cli import main
from peerdistill.config import load
from peerdistill import run as run_mod
from peerdistill.engine.trainer import Trainer
from peerdistill.methods import sd_dropout as sdd_mod

from .conftest import killed_and_resumed
from .reference import as_float64, close32, has_grad

BASE = ["data.name=synthetic", "data.size=64", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=64", "data.val_split=0", "threads=1"]


def trainer(*over: str) -> Trainer:
    return Trainer(load(None, [*BASE, *over]), None)


def first_batch(tr: Trainer):
    return next(iter(tr.train_loader))


def step64(tr: Trainer, batch=None):
    """One engine step record with the step module (cohort + method) and the record in float64."""
    rec = tr.step_record(first_batch(tr) if batch is None else batch)
    tr.module.double()
    return as_float64(rec)


# ------------------------------------------------------------------ hand-written maths
def log_sm(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - z.logsumexp(1, keepdim=True)


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes, batch mean."""
    return (lp.exp() * (lp - lq)).sum(1).mean()


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -log_sm(z)[torch.arange(len(y)), y].mean()


def close(a: torch.Tensor, b: torch.Tensor | float) -> bool:
    """A library value computed in float64 against a float64 hand value."""
    return float(torch.as_tensor(a).detach()) == pytest.approx(float(torch.as_tensor(b).detach()), rel=1e-10)


def known_dropout(monkeypatch, seed: int = 7):
    """Replace F.dropout (as SD-Dropout calls it) by inverted dropout with recorded, reproducible masks."""
    masks: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(seed)

    def fake(x, p=0.5, training=True, inplace=False):
        assert training
        m = (torch.rand(x.shape, generator=g) >= p).float()
        masks.append(m)
        return x * m / (1 - p)

    monkeypatch.setattr(sdd_mod.F, "dropout", fake)
    return masks


def hand_sdd(head: torch.nn.Linear, f_u: torch.Tensor, f_v: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 [KL(p_u || p_v) + KL(p_v || p_u)] of two dropped features through one classifier."""
    w, b = head.weight.detach().double(), head.bias.detach().double()
    lu, lv = log_sm((f_u.double() @ w.T + b) / t), log_sm((f_v.double() @ w.T + b) / t)
    return t * t * (kl(lu, lv) + kl(lv, lu))


# ------------------------------------------------------------------ CS-KD
@pytest.mark.numerical
def test_cs_kd_partners_are_same_class_run_without_grad_after_the_anchors_and_ce_is_on_anchors():
    tr = trainer("method=cs_kd", "peers=1")
    batch = first_batch(tr)
    assert batch.images.shape[0] == 32  # 16 anchors + 16 partners
    views = tr.method.make_views(batch, tr.view_context(torch.Generator().manual_seed(3)))
    anchor, partner = views.peers[0], views.extra["partner"].views[0]
    assert not views.extra["partner"].grad and len(anchor.labels) == 16
    assert torch.equal(anchor.labels, partner.labels) and torch.equal(anchor.index, batch.index[:16])
    net = copy.deepcopy(tr.cohort.nets[0]).train()
    tr.gen.manual_seed(3)
    rec = tr.step_record(batch)
    with torch.no_grad():  # the official order: anchors with grad, then partners under no_grad, both train mode
        z_a, z_p = net(anchor.x), net(partner.x)
    bn, bn_copy = tr.cohort.nets[0].stem[1], net.stem[1]
    # the same float32 computations re-run on the same inputs: equal within float32 rounding of their size
    assert close32(bn.running_mean, bn_copy.running_mean, bn_copy.running_mean.abs().max())  # partners updated BN
    assert close32(rec.outputs[0].logits, z_a, z_a.abs().max())
    p_out = rec.extra["partner"][0]
    assert not p_out.logits.requires_grad and close32(p_out.logits, z_p, z_p.abs().max())
    tr.module.double()
    rec = as_float64(rec)
    rec.outputs[0].logits.retain_grad()
    terms = tr.method.losses(rec)
    assert set(terms) == {"ce0", "cls0"}
    z = rec.outputs[0].logits.detach()
    assert close(terms["ce0"], ce(z, anchor.labels))
    leaf = z.clone().requires_grad_(True)
    hand = 16.0 * kl(log_sm(rec.extra["partner"][0].logits / 4.0), log_sm(leaf / 4.0))  # lam 1, T 4: 4^2 KL(p(x')||p(x))
    assert close(terms["cls0"], hand)
    terms["cls0"].backward()
    g = torch.autograd.grad(hand, leaf)[0]
    assert torch.allclose(rec.outputs[0].logits.grad, g, rtol=1e-10, atol=1e-14)


def test_cs_kd_mixer_mixes_partners_with_the_anchors_draw():
    tr = trainer("method=cs_kd", "peers=1", "mixer=cutmix", "mixer.prob=1.0")
    views = tr.method.make_views(first_batch(tr), tr.view_context(torch.Generator().manual_seed(0)))
    anchor, partner = views.peers[0], views.extra["partner"].views[0]
    assert anchor.mix is not None and partner.mix is anchor.mix
    assert torch.equal(anchor.soft_targets(5), partner.soft_targets(5))  # same label mixture per row


# ------------------------------------------------------------------ DDGSD
@pytest.mark.numerical
def test_ddgsd_is_one_2b_view_and_its_terms_match_the_formula():
    tr = trainer("method=ddgsd", "peers=1")
    rec = step64(tr)
    v = rec.views[0]
    assert v.x.shape[0] == 32 and not torch.equal(v.x[:16], v.x[16:])  # two independent distortions
    assert torch.equal(v.labels[:16], v.labels[16:]) and torch.equal(v.index[:16], v.index[16:])
    o = rec.outputs[0]
    o.logits.retain_grad()
    terms = tr.method.losses(rec)
    z, f, y = o.logits.detach(), o.embedding.detach(), v.labels[:16]
    assert close(terms["ce0"], ce(z[:16], y) + ce(z[16:], y))
    l1, l2 = log_sm(z[:16] / 3), log_sm(z[16:] / 3)
    assert close(terms["kl0"], 9 * (kl(l2, l1) + kl(l1, l2)))
    assert close(terms["mmd0"], 0.005 * ((f[:16].mean(0) - f[16:].mean(0)) ** 2).sum())
    terms["kl0"].backward()  # targets detached: each half's gradient is its own KL's
    leaf = z.clone().requires_grad_(True)
    a, b = log_sm(leaf[:16] / 3), log_sm(leaf[16:] / 3)
    g = torch.autograd.grad(9 * (kl(b.detach(), a) + kl(a.detach(), b)), leaf)[0]
    assert torch.allclose(o.logits.grad, g, rtol=1e-10, atol=1e-14)


@pytest.mark.numerical
def test_ddgsd_self_kd_lib_options_and_shared_mix_of_both_halves():
    tr = trainer("method=ddgsd", "peers=1", "method.temperature=4", "method.ce_weight=0.25",
                 "method.mmd=scalar", "method.mmd_weight=5e-4")
    rec = step64(tr)
    terms = tr.method.losses(rec)
    z, f, y = rec.outputs[0].logits.detach(), rec.outputs[0].embedding.detach(), rec.labels[:16]
    assert close(terms["ce0"], ce(z, torch.cat([y, y])) / 2)  # SKL: half the CE over the 2B rows
    l1, l2 = log_sm(z[:16] / 4), log_sm(z[16:] / 4)
    assert close(terms["kl0"], 16 * (kl(l2, l1) + kl(l1, l2)))
    assert close(terms["mmd0"], 5e-4 * (f[:16].mean() - f[16:].mean()) ** 2)
    tr = trainer("method=ddgsd", "peers=1", "mixer=cutmix", "mixer.prob=1.0")
    mix = tr.step_record(first_batch(tr)).views[0].mix
    assert mix is not None and mix.perms.shape[1] == 32
    assert torch.equal(mix.perms[:, 16:], mix.perms[:, :16] + 16)  # view 2 of i mixed with view 2 of perm(i)
    assert torch.equal(mix.pixel_weights[:, 16:], mix.pixel_weights[:, :16])  # same box


@pytest.mark.numerical
def test_ddgsd_sd_dropout_addon_draws_one_mask_over_both_views(monkeypatch):
    tr = trainer("method=ddgsd", "peers=1", "addon=sd_dropout", "addon.lam=0.3")
    rec = step64(tr)
    masks = known_dropout(monkeypatch)
    terms = tr.addons[0].losses(rec, tr.method)
    assert set(terms) == {"sdd0"} and len(masks) == 1 and masks[0].shape == (32, 64)
    f, m = rec.outputs[0].embedding.detach(), masks[0]
    expected = 0.3 * hand_sdd(tr.cohort.nets[0].classifier, f[:16] * m[:16] / 0.5, f[16:] * m[16:] / 0.5, 3.0)
    assert close(terms["sdd0"], expected)


# ------------------------------------------------------------------ BYOT
@pytest.fixture(scope="module")
def byot():
    return trainer("method=byot")


@pytest.mark.numerical
def test_byot_heads_reach_the_last_stage_size_and_losses_match_the_formula(byot):
    tr, m = byot, byot.method
    assert len(tr.cohort) == 1 and len(m.aux) == 2 and tr.taps == ("*",)
    rec = step64(tr)
    o = rec.outputs[0]
    last = o.maps["stage3"].shape[-1]
    assert [head.body(o.maps[s]).shape[-1] for s, head in zip(("stage1", "stage2"), m.aux)] == [last, last]
    terms = m.losses(rec)
    assert set(terms) == {"ce0", "ce_aux1", "kl_aux1", "hint_aux1", "ce_aux2", "kl_aux2", "hint_aux2"}
    z, f, y = o.logits.detach(), o.embedding.detach(), rec.labels
    assert close(terms["ce0"], ce(z, y))
    for i, s in ((1, "stage1"), (2, "stage2")):
        with torch.no_grad():
            h = m.aux[i - 1].body(o.maps[s]).mean((2, 3))
            zi = m.aux[i - 1].fc(h)
        assert close(terms[f"ce_aux{i}"], 0.9 * ce(zi, y))
        assert close(terms[f"kl_aux{i}"], 0.1 * 9 * kl(log_sm(z / 3), log_sm(zi / 3)))
        assert close(terms[f"hint_aux{i}"], 1e-6 * ((h - f) ** 2).mean())
    m.variant = "byotl"
    try:
        other = m.losses(rec)
    finally:
        m.variant = "skd"
    assert close(other["ce0"], 0.9 * ce(z, y))
    h = m.aux[0].body(o.maps["stage1"]).mean((2, 3)).detach()
    assert close(other["hint_aux1"], 1e-6 * ((h - f) ** 2).sum())
    tr.module.float()  # the module-scoped trainer goes on in float32


def test_byot_gradient_routing_keeps_the_teacher_side_detached(byot):
    tr, m = byot, byot.method
    net = tr.cohort.nets[0]
    checks = {  # term -> (parameters that must learn from it, parameters that must not)
        "kl_aux1": ([m.aux[0].parameters(), net.stages[0].parameters()],
                    [net.classifier.parameters(), net.stages[2].parameters(), m.aux[1].parameters()]),
        "hint_aux2": ([m.aux[1].body.parameters(), net.stages[1].parameters()],
                      [m.aux[1].fc.parameters(), net.stages[2].parameters(), net.classifier.parameters()]),
        "ce0": ([net.classifier.parameters(), net.stages[2].parameters()], [m.aux.parameters()]),
        "ce_aux2": ([m.aux[1].parameters(), net.stages[0].parameters()], [net.stages[2].parameters()]),
    }
    for term, (learn, frozen) in checks.items():
        tr.optimizer.zero_grad(set_to_none=True)
        m.losses(tr.step_record(first_batch(tr)))[term].backward()
        assert all(has_grad(p) for p in learn), term
        assert not any(has_grad(p) for p in frozen), term


@pytest.mark.numerical
def test_byot_evaluates_final_aux_and_their_ensemble(byot):
    tr, m = byot, byot.method
    tr.module.eval()
    try:
        with torch.no_grad():
            x = tr.augment.normalize(first_batch(tr).images)
            outs = tr.cohort([x], tr.taps)
            heads = m.eval_heads(outs)
            zs = [outs[0].logits] + [head(outs[0].maps[s])[0] for s, head in zip(("stage1", "stage2"), m.aux)]
    finally:
        tr.module.train()
    assert set(heads) == {"peer0", "aux1", "aux2", "ensemble"}
    assert torch.equal(heads["aux2"], zs[2])
    mean_p = sum(log_sm(z).exp() for z in zs) / 3  # a mean of probabilities: its log rounds within a few ulps
    assert close32(heads["ensemble"], mean_p.log(), 1.0)


# ------------------------------------------------------------------ Tf-KD_reg
@pytest.mark.numerical
def test_tf_kd_reg_matches_the_official_formula():
    tr = trainer("method=tf_kd", "peers=1", "method.temperature=5", "method.alpha=0.3", "method.multiplier=10",
                 "method.correct_prob=0.9")
    rec = step64(tr)
    terms = tr.method.losses(rec)
    z, y, k = rec.outputs[0].logits.detach(), rec.labels, 5
    u = torch.full((len(y), k), 0.1 / 4, dtype=torch.float64)
    u[torch.arange(len(y)), y] = 0.9
    q = torch.softmax(u / 5, 1)  # softmax of the probabilities / tau; the student is not softened
    kl_mean = (q * (q.log() - log_sm(z))).sum() / (len(y) * k)  # nn.KLDivLoss(): mean over all B x K entries
    assert close(terms["ce0"], 0.7 * ce(z, y))
    assert close(terms["reg0"], 0.3 * 10 * kl_mean)
    tr.method.correct_prob, tr.method.temperature = 0.99, 20.0  # the defaults, on CIFAR-100's 100 classes:
    q100 = tr.method.teacher(torch.tensor([3]), 100, torch.float64)[0]  # a nearly uniform teacher (baselines §10.1)
    e_y, e_o = (torch.tensor(v, dtype=torch.float64).exp() for v in (0.99 / 20, 0.01 / 99 / 20))
    assert close(q100[3], e_y / (e_y + 99 * e_o)) and 0.0104 < float(q100[3]) < 0.0106


# ------------------------------------------------------------------ PS-KD
@pytest.mark.numerical
def test_ps_kd_target_mixes_labels_with_the_stored_previous_predictions():
    tr = trainer("method=ps_kd", "peers=1", "epochs=10")
    assert tr.method.store.shape == (1, 64, 5) and torch.equal(tr.method.store[0].argmax(1), tr.data.train.labels)
    first = tr.step_record(first_batch(tr))  # epoch 0: the one-hot start
    tr.epoch = 3
    later = tr.step_record(first_batch(tr))
    tr.module.double()
    first, rec = as_float64(first), as_float64(later)
    store = tr.method.store
    assert close(tr.method.losses(first)["ce0"], ce(first.outputs[0].logits.detach(), first.labels))  # hard labels
    store.copy_(torch.softmax(torch.randn(store.shape, generator=torch.Generator().manual_seed(1)), -1))
    before = store.clone()
    z, y, idx = rec.outputs[0].logits.detach(), rec.labels, rec.index
    a = 0.8 * 4 / 10  # alpha_T (e + 1) / E
    target = (1 - a) * torch.nn.functional.one_hot(y, 5).double() + a * before[0, idx]
    assert close(tr.method.losses(rec)["ce0"], -(target * log_sm(z)).sum(1).mean())
    tr.method.update(rec)
    assert torch.allclose(store[0, idx], torch.softmax(z, 1), rtol=1e-12, atol=0)  # the augmented view's output
    rest = torch.ones(64, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(store[0, rest], before[0, rest])


@pytest.mark.numerical
def test_ps_kd_mixed_batches_mix_the_targets_and_store_nothing():
    tr = trainer("method=ps_kd", "peers=1", "mixer=mixup", "mixer.prob=1.0", "epochs=4")
    tr.epoch = 1
    rec = step64(tr)
    tr.method.store.fill_(0.2)
    before = tr.method.store.clone()
    v, z = rec.views[0], rec.outputs[0].logits.detach()
    a = 0.8 * 2 / 4
    target = (1 - a) * torch.nn.functional.one_hot(v.labels, 5).double() + a * 0.2
    mixed = v.mix.weights[0, :, None] * target[v.mix.perms[0]] + v.mix.weights[1, :, None] * target[v.mix.perms[1]]
    assert close(tr.method.losses(rec)["ce0"], -(mixed * log_sm(z)).sum(1).mean())
    tr.method.update(rec)
    assert torch.equal(tr.method.store, before)


def test_ps_kd_resume_continues_with_the_exact_stored_predictions(tmp_path, monkeypatch):
    over = [*BASE, "method=ps_kd", "peers=1", "epochs=2"]
    full = run_mod.train(load(None, over), tmp_path / "full", echo=False)
    resumed = killed_and_resumed(lambda: load(None, over), tmp_path / "cut", monkeypatch)
    assert resumed["final"] == full["final"]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert torch.equal(a["method"]["store"], b["method"]["store"])
    assert a["method"]["store"].max() < 1.0  # every sample's prediction was written over the one-hot start
    assert all(torch.equal(v, b["cohort"][k]) for k, v in a["cohort"].items())


# ------------------------------------------------------------------ SD-Dropout v2 and the add-on
@pytest.mark.numerical
@pytest.mark.parametrize("detach", [False, True])
def test_sd_dropout_v2_undropped_student_dropped_teacher(monkeypatch, detach):
    tr = trainer("method=sd_dropout", "peers=1", "method.variant=v2", f"method.detach={str(detach).lower()}",
                 "method.lam=0.5")
    rec = step64(tr)
    captured: list[torch.Tensor] = []

    def hook(_module, _inp, out):
        out.retain_grad()
        captured.append(out)

    masks = known_dropout(monkeypatch)
    handle = rec.heads[0].register_forward_hook(hook)
    try:
        terms = tr.method.losses(rec)
    finally:
        handle.remove()
    assert len(masks) == 1 and len(captured) == 2  # one dropout sample; head(f) and head(drop(f))
    z, zd = (c.detach() for c in captured)
    f = rec.outputs[0].embedding.detach()
    w, b = rec.heads[0].weight.detach(), rec.heads[0].bias.detach()
    assert torch.allclose(z, f @ w.T + b, rtol=1e-12, atol=1e-14)
    assert torch.allclose(zd, (f * masks[0] / 0.5) @ w.T + b, rtol=1e-12, atol=1e-14)
    assert close(terms["sdd0"], 0.5 * 9 * kl(log_sm(zd / 3), log_sm(z / 3)))  # T^2 KL(p_drop || p)
    terms["sdd0"].backward()
    assert captured[0].grad is not None and captured[0].grad.abs().sum() > 0  # the student learns
    assert (captured[1].grad is None or not captured[1].grad.any()) == detach  # the teacher only without detach


@pytest.mark.numerical
@pytest.mark.parametrize("method", ["dml", "cs_kd", "byot"])
def test_sd_dropout_addon_acts_on_each_methods_features(monkeypatch, method):
    peers = 2 if method == "dml" else 1
    tr = trainer(f"method={method}", f"peers={peers}", "addon=sd_dropout")
    rec = step64(tr)
    masks = known_dropout(monkeypatch)
    terms = tr.addons[0].losses(rec, tr.method)
    assert set(terms) == {f"sdd{i}" for i in range(peers)} and len(masks) == 2 * peers
    for i in range(peers):  # each network's own embedding with its OWN classifier (not network 0's)
        f = rec.outputs[i].embedding.detach()
        assert f.shape[0] == 16  # CS-KD: the anchors only
        expected = 0.1 * hand_sdd(tr.cohort.nets[i].classifier, f * masks[2 * i] / 0.5, f * masks[2 * i + 1] / 0.5, 3.0)
        assert close(terms[f"sdd{i}"], expected)


@pytest.mark.parametrize("method", ["dml", "cs_kd", "ddgsd", "byot"])
def test_sd_dropout_addon_trains_with_the_method_and_is_checkpointed(method):
    tr = trainer(f"method={method}", f"peers={2 if method == 'dml' else 1}", "addon=sd_dropout")
    terms = tr.train_step(first_batch(tr))
    assert "sdd0" in terms and "ce0" in terms and all(torch.isfinite(v) for v in terms.values())
    assert "addons" in tr.state() and len(tr.state()["addons"]) == 1


# ------------------------------------------------------------------ bad values
@pytest.mark.parametrize("over, needle", [
    (["method=cs_kd", "method.lam=-1"], "lam"),
    (["method=ddgsd", "method.mmd=mean"], "mmd"),
    (["method=byot", "method.alpha=1.5"], "alpha"),
    (["method=tf_kd", "method.correct_prob=1.0"], "correct_prob"),
    (["method=ps_kd", "method.alpha_t=2"], "alpha_t"),
    (["method=sd_dropout", "method.variant=v3"], "variant"),
    (["method=dml", "addon=sd_dropout", "addon.beta=1.0"], "beta"),
    (["method=sd_dropout", "peers=1", "addon=sd_dropout"], "twice"),
])
def test_bad_values_are_one_line_errors(over, needle, capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), *BASE, *over])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (out / "checkpoints").exists()
