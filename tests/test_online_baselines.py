"""The online-KD baselines of the PCL/DKEL tables: CL-ILR, OKDDip, KDCL, FFL.

Golden values are written out here with numpy / plain torch (never the library's helpers); gradient
routing checks which parameters each loss term reaches; cohorts are built for every PCL-table model.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peerdistill.config import load
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.methods import METHODS, DataInfo, StepRecord
from peerdistill.methods.functional import linear_ensemble_weights, min_logit_ensemble
from peerdistill.models.cohort import build_cohort
from .reference import branch, close32, f32, has_grad, no_grad, np_ce, np_ce_mag, np_kd, np_kd_mag, record

BASE = ["data.name=synthetic", "data.size=48", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=64", "data.val_split=0"]
PCL_MODELS = ["resnet32", "resnet110", "vgg16", "densenet40_12", "wrn_20_8"]


def trainer(*over: str) -> Trainer:
    return Trainer(load(None, [*BASE, *over]), out_dir=None)


def trunk(tr: Trainer) -> list[torch.nn.Parameter]:
    net = tr.cohort.nets[0]
    return [*net.stem.parameters(), *(p for s in net.stages[:tr.cohort.shared] for p in s.parameters())]


# ------------------------------------------------------------------ hand-written reference maths
def logits(rec: StepRecord) -> list[np.ndarray]:
    return [o.logits.detach().double().numpy() for o in rec.outputs]


def values(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


# ------------------------------------------------------------------ every PCL-table model builds
@pytest.mark.parametrize("model", PCL_MODELS)
def test_each_method_builds_its_cohort_for_every_pcl_table_model(model):
    """Only builds (no training): the default split of every branched method, its modules' sizes."""
    info = DataInfo(100, 8, torch.zeros(8, dtype=torch.long), 3, (16, 16))  # 16x16 keeps FFL's shape probe cheap
    cohort = build_cohort([model], 3, 100, 3, {}, "branched", None)  # the default split_after of all three
    names, d = cohort.nets[0].stage_names, cohort.nets[0].num_features
    assert cohort.shared == len(names) - 1  # stem + every stage but the last (OKDDip / ONE / FFL layout)
    methods = {name: METHODS.build(name) for name in ("cl_ilr", "okddip", "ffl")}
    for m in methods.values():
        assert m.needs.topology == "branched" and m.needs.split_after is None
        m.setup(cohort, info)
    assert methods["cl_ilr"].needs.trunk_grad == "mean"  # the engine's cohort then scales the trunk's gradient by 1/3
    okd, ffl = methods["okddip"], methods["ffl"]
    assert (okd.query.in_features, okd.query.out_features) == (d, d // 8)
    assert ffl.needs.taps == (names[-1],) and ffl.fusion.depthwise.in_channels == 3 * d
    assert (ffl.fusion.pointwise.out_channels, ffl.fusion.fc.out_features) == (d, 100)
    kdcl = METHODS.build("kdcl")  # independent students: any registered model, nothing method-specific
    assert kdcl.needs.topology == "independent" and kdcl.needs.views == "per_peer"


# ------------------------------------------------------------------ CL-ILR
@pytest.mark.numerical
def test_cl_ilr_terms_match_hand_formula():
    tr = trainer("method=cl_ilr", "peers=3", "method.ce_weight=0.3", "method.weight=0.6",
                 "method.temperature=2.5", "method.rampup_epochs=10")
    rec = record(tr, epoch=5)
    terms = values(tr.method.losses(rec))
    assert set(terms) == {"ce0", "ce1", "ce2", "kl0", "kl1", "kl2"}
    z, y = logits(rec), rec.labels.numpy()
    w = 0.6 * math.exp(-5 * (1 - 5 / 10) ** 2)
    for i in range(3):
        others = (z[(i + 1) % 3] + z[(i + 2) % 3]) / 2  # the other heads' mean logits, then softened
        assert terms[f"ce{i}"] == f32(0.3 * np_ce(z[i], y), 0.3 * np_ce_mag(z[i], y))
        assert terms[f"kl{i}"] == f32(w * np_kd(z[i], others, 2.5), w * np_kd_mag(z[i], others, 2.5))


def test_cl_ilr_trunk_gradient_is_exactly_one_mth_of_the_unscaled_one():
    # m = 4 heads: scaling by 1/4 is exact in binary floating point, so the check is bit for bit on any CPU
    grads = {}
    for rescale in ("true", "false"):
        tr = trainer("method=cl_ilr", "peers=4", f"method.rescale={rescale}")
        assert tr.cohort.trunk_grad_scale == (0.25 if rescale == "true" else 1.0)
        sum(tr.method.losses(record(tr)).values()).backward()
        grads[rescale] = ([p.grad.clone() for p in trunk(tr)], [p.grad.clone() for p in branch(tr, 1)])
    (t_on, b_on), (t_off, b_off) = grads["true"], grads["false"]
    assert any(g.abs().sum() > 0 for g in t_off)
    assert all(torch.equal(g_on, g_off / 4) for g_on, g_off in zip(t_on, t_off))
    assert all(torch.equal(g_on, g_off) for g_on, g_off in zip(b_on, b_off))  # the branches' own: not rescaled


@pytest.mark.parametrize("detach", [True, False])
def test_cl_ilr_target_detach_decides_whether_kd_reaches_the_other_heads(detach):
    tr = trainer("method=cl_ilr", "peers=3", f"method.detach_targets={str(detach).lower()}")
    tr.method.losses(record(tr))["kl0"].backward()
    assert has_grad(branch(tr, 0))
    assert no_grad(branch(tr, 1)) == detach and no_grad(branch(tr, 2)) == detach


# ------------------------------------------------------------------ OKDDip
def okddip_trainer(*over: str) -> Trainer:
    return trainer("method=okddip", "peers=4", *over)


@pytest.fixture(scope="module")
def okddip_default() -> Trainer:
    """One default 4-network OKDDip trainer shared by the read-only and gradient-routing tests."""
    return okddip_trainer()


@pytest.mark.numerical
def test_okddip_attention_and_terms_match_hand_computation():
    tr = okddip_trainer("method.temperature=2.0", "method.weight=0.5")
    m = tr.method
    rec = record(tr, epoch=40)
    h = [o.embedding.detach().double().numpy() for o in rec.outputs[:3]]  # the 3 auxiliary peers
    wq, wk = m.query.weight.detach().double().numpy(), m.key.weight.detach().double().numpy()
    assert wq.shape == (8, 64)  # d = 64 -> d / 8
    z, y = logits(rec), rec.labels.numpy()
    got_a = m.attention(rec.outputs[:3]).detach().double().numpy()  # (B, 3, 3)
    x_all = m.peer_targets(rec.outputs[:3]).detach().double().numpy()  # (B, 3, K)
    for b in range(len(y)):
        q = np.stack([h[i][b] @ wq.T for i in range(3)])  # (3, 8)
        k = np.stack([h[j][b] @ wk.T for j in range(3)])
        energy = q @ k.T  # no 1/sqrt(d), j ranges over every peer including i
        a = np.exp(energy - energy.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        # float32 rounds each energy within the size of its terms |q| |k| (themselves |h| |W|); a softmax
        # weight moves by at most 2 a_ij max|d energy|, and x_i = sum_j a_ij z_j rounds within max|z|
        e_mag = np.stack([np.abs(h[i][b]) @ np.abs(wq).T for i in range(3)]) @ np.stack(
            [np.abs(h[j][b]) @ np.abs(wk).T for j in range(3)]).T
        a_mag = 2 * a * 2 * e_mag.max()
        assert close32(torch.from_numpy(got_a[b]), a, a_mag)
        zb = np.stack([z[j][b] for j in range(3)])
        x = a @ zb  # x_i = sum_j a_ij z_j
        assert close32(torch.from_numpy(x_all[b]), x, np.abs(zb).max() * (1 + a_mag.sum(1, keepdims=True)))
    terms = values(m.losses(rec))
    assert set(terms) == {"ce0", "ce1", "ce2", "kl0", "kl1", "kl2", "ce_leader", "kl_leader"}
    w = 0.5 * math.exp(-5 * (1 - 40 / 80) ** 2)
    for i in range(3):
        assert terms[f"ce{i}"] == f32(np_ce(z[i], y), np_ce_mag(z[i], y))
        assert terms[f"kl{i}"] == f32(w * np_kd(z[i], x_all[:, i], 2.0), w * np_kd_mag(z[i], x_all[:, i], 2.0))
    assert terms["ce_leader"] == f32(np_ce(z[3], y), np_ce_mag(z[3], y))
    z_mean = (z[0] + z[1] + z[2]) / 3
    assert terms["kl_leader"] == f32(w * np_kd(z[3], z_mean, 2.0), w * np_kd_mag(z[3], z_mean, 2.0))


def test_okddip_gradient_routing_with_undetached_targets(okddip_default):
    tr = okddip_default
    tr.optimizer.zero_grad(set_to_none=True)
    m = tr.method
    attn = [m.query.weight, m.key.weight]
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optim for p in attn)
    terms = m.losses(record(tr))
    terms["ce0"].backward(retain_graph=True)
    assert no_grad(attn)  # the attention enters only the KD targets
    tr.optimizer.zero_grad(set_to_none=True)
    terms["kl0"].backward(retain_graph=True)
    assert has_grad(attn[:1]) and has_grad(attn[1:])  # W_q and W_k learn through peer 0's target
    assert has_grad(branch(tr, 0)) and has_grad(branch(tr, 1))  # x_0 mixes the peers' logits
    assert no_grad(branch(tr, 3))  # the leader takes no part in the attention
    tr.optimizer.zero_grad(set_to_none=True)
    terms["kl_leader"].backward()
    assert has_grad(branch(tr, 3)) and all(has_grad(branch(tr, i)) for i in range(3))  # reaches the peers
    assert no_grad(attn)


def test_okddip_detached_targets_keep_kd_on_the_student_only():
    tr = okddip_trainer("method.detach_targets=true")
    terms = tr.method.losses(record(tr))
    terms["kl0"].backward(retain_graph=True)
    assert no_grad([tr.method.query.weight, tr.method.key.weight]) and no_grad(branch(tr, 1))
    tr.optimizer.zero_grad(set_to_none=True)
    terms["kl_leader"].backward()
    assert has_grad(branch(tr, 3)) and not any(has_grad(branch(tr, i)) for i in range(3))


def test_okddip_eval_heads_are_the_peers_their_ensemble_and_the_leader(okddip_default):
    tr = okddip_default
    rec = record(tr)
    heads = tr.method.eval_heads(rec.outputs)
    assert set(heads) == {"peer0", "peer1", "peer2", "ensemble", "logit_ensemble", "leader"}
    assert torch.equal(heads["leader"], rec.outputs[3].logits)
    probs = sum(torch.softmax(o.logits.detach(), 1) for o in rec.outputs[:3]) / 3  # leader excluded
    assert close32(heads["ensemble"].exp(), probs, 1.0)  # probabilities: magnitude 1
    # the official train_GL.py logs torch.mean(output_batch, dim=2): the peers' mean logits, leader excluded
    z = torch.stack([o.logits.detach().double() for o in rec.outputs[:3]])
    assert close32(heads["logit_ensemble"], z.mean(0), z.abs().amax(0))


# ------------------------------------------------------------------ KDCL
def test_kdcl_ensembles_on_hand_written_logits():
    z0 = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    z1 = torch.tensor([[1.0, 1.0, 3.0], [-1.0, 2.0, 1.0]])
    y = torch.tensor([0, 1])
    q = F.one_hot(y, 3).float()
    # MinLogit: z_i - z_{i,y}, then the element-wise min over students
    expected = torch.tensor([[min(0.0, 0.0), min(-2.0, 0.0), min(-3.0, 2.0)],
                             [min(-1.0, -3.0), 0.0, min(-1.5, -1.0)]])
    assert torch.equal(min_logit_ensemble([z0, z1], q), expected)
    mixed = torch.tensor([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])  # a mixed label subtracts <q, z_i>
    row0 = torch.minimum(z0[0] - (0.25 * 2.0 + 0.75 * 0.0), z1[0] - (0.25 * 1.0 + 0.75 * 1.0))
    assert torch.allclose(min_logit_ensemble([z0, z1], mixed)[0], row0)
    # Linear: simplex weights minimising the CE of the combination, against a brute-force grid
    g = torch.Generator().manual_seed(0)
    for m in (2, 3):
        zs = [torch.randn(8, 5, generator=g) * 3 for _ in range(m)]
        yy = torch.randint(0, 5, (8,), generator=g)
        w = linear_ensemble_weights(zs, F.one_hot(yy, 5).float(), steps=200)
        assert w.shape == (m,) and float(w.sum()) == pytest.approx(1.0, abs=1e-6) and bool((w >= 0).all())
        zn = [t.double().numpy() for t in zs]
        grid = np.linspace(0, 1, 201)
        cands = ([(a, 1 - a) for a in grid] if m == 2 else
                 [(a, b, 1 - a - b) for a in grid for b in grid if a + b <= 1 + 1e-12])
        ce = [np_ce(sum(c * zi for c, zi in zip(cand, zn)), yy.numpy()) for cand in cands]
        best = int(np.argmin(ce))
        got = np_ce(sum(float(c) * zi for c, zi in zip(w, zn)), yy.numpy())
        assert got <= ce[best] + 1e-4
        assert np.allclose(w.numpy(), cands[best], atol=0.02)
        w20 = linear_ensemble_weights(zs, F.one_hot(yy, 5).float())  # the default 20 steps: close enough
        assert np_ce(sum(float(c) * zi for c, zi in zip(w20, zn)), yy.numpy()) <= ce[best] + 1e-2


@pytest.mark.numerical
@pytest.mark.parametrize("ensemble", ["naive", "linear", "minlogit"])
def test_kdcl_terms_match_hand_formula_and_targets_stay_detached(ensemble):
    tr = trainer("method=kdcl", "peers=2", f"method.ensemble={ensemble}", "method.weight=0.7")
    rec = record(tr)
    assert rec.views[0].x is not rec.views[1].x and not torch.equal(rec.views[0].x, rec.views[1].x)
    assert torch.equal(rec.views[0].index, rec.views[1].index)  # the same images, augmented apart
    z, y = logits(rec), rec.labels.numpy()
    if ensemble == "naive":
        target = (z[0] + z[1]) / 2
    elif ensemble == "minlogit":
        target = np.minimum(*(zi - zi[np.arange(len(y)), y][:, None] for zi in z))
    else:
        w = linear_ensemble_weights([o.logits for o in rec.outputs], rec.views[0].soft_targets(5)).double().numpy()
        target = w[0] * z[0] + w[1] * z[1]
    terms = tr.method.losses(rec)
    got = values(terms)
    for i in range(2):
        assert got[f"ce{i}"] == f32(np_ce(z[i], y), np_ce_mag(z[i], y))
        # the target combines the students' logits (minlogit: differences of two): it rounds within their size
        t_mag = 2 * (np.abs(z[0]) + np.abs(z[1]))
        kd_mag = np_kd_mag(z[i], target, 2.0, teacher_mag=t_mag)
        assert got[f"kl{i}"] == f32(0.7 * np_kd(z[i], target, 2.0), 0.7 * kd_mag)
    terms["kl0"].backward()
    assert has_grad(tr.cohort.nets[0].parameters()) and no_grad(tr.cohort.nets[1].parameters())


def test_kdcl_trains_heterogeneous_students():
    tr = trainer("method=kdcl", "peers=2", "model=resnet8,resnet14", "method.ensemble=linear")
    sizes = [sum(p.numel() for p in net.parameters()) for net in tr.cohort.nets]
    assert sizes[0] < sizes[1]
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert all(torch.isfinite(v) for v in terms.values())


# ------------------------------------------------------------------ FFL
def hand_fusion(fusion, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fusion module written out in float64: depthwise conv, BN (batch statistics), ReLU, 1x1, BN, ReLU,
    GAP, FC. Also returns the magnitude a float32 forward rounds within: every layer's sum of |terms|,
    carried forward through |W| (a first-order running bound)."""
    def bn(x, m, mod):
        mu, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        sd, g, b = torch.sqrt(var + mod.eps), mod.weight.double().view(1, -1, 1, 1), mod.bias.double().view(1, -1, 1, 1)
        return (x - mu) / sd * g + b, (m + mu.abs()) / sd * g.abs() + b.abs()

    def conv(x, m, w, **kw):
        return F.conv2d(x, w.double(), **kw), F.conv2d(m, w.double().abs(), **kw)

    x = torch.cat([t.detach().double() for t in maps], 1)
    c, m = x.shape[1], x.abs()
    x, m = bn(*conv(x, m, fusion.depthwise.weight, padding=1, groups=c), fusion.bn1)
    x, m = bn(*conv(torch.relu(x), m, fusion.pointwise.weight), fusion.bn2)
    x, m = torch.relu(x).mean((2, 3)), m.mean((2, 3))
    w, b = fusion.fc.weight.double(), fusion.fc.bias.double()
    return x @ w.T + b, m @ w.abs().T + b.abs()


@pytest.mark.numerical
def test_ffl_fused_logits_and_terms_match_hand_formula():
    tr = trainer("method=ffl", "peers=2", "method.temperature=2.0", "method.weight=0.8")
    m = tr.method
    assert tr.cohort.shared == 2 and tr.taps == ("stage3",)
    rec = record(tr, epoch=20)
    with torch.no_grad():
        z_f, zf_mag = hand_fusion(m.fusion, [o.maps["stage3"] for o in rec.outputs])
        assert close32(m.fused(rec.outputs), z_f, zf_mag)
    terms = values(m.losses(rec))
    assert set(terms) == {"ce0", "ce1", "ce_fused", "kl0", "kl1", "kl_fused"}
    z, zf, zf_mag, y = logits(rec), z_f.numpy(), zf_mag.numpy(), rec.labels.numpy()
    w = 0.8 * math.exp(-5 * (1 - 20 / 80) ** 2)
    for i in range(2):
        assert terms[f"ce{i}"] == f32(np_ce(z[i], y), np_ce_mag(z[i], y))
        assert terms[f"kl{i}"] == f32(w * np_kd(z[i], zf, 2.0), w * np_kd_mag(z[i], zf, 2.0, teacher_mag=zf_mag))
    # the library's fused logits round within zf_mag: a CE moves by at most 2 per unit, a KL by 2 T
    assert terms["ce_fused"] == f32(np_ce(zf, y), np_ce_mag(zf, y) + 2 * zf_mag.max(1).mean())
    z_mean = (z[0] + z[1]) / 2
    kl_fused_mag = np_kd_mag(zf, z_mean, 2.0) + 2 * 2.0 * zf_mag.max(1).mean()
    assert terms["kl_fused"] == f32(w * np_kd(zf, z_mean, 2.0), w * kl_fused_mag)
    m.eval()
    assert set(m.eval_heads(rec.outputs)) == {"peer0", "peer1", "ensemble", "fused"}


def test_ffl_gradient_routing_and_fusion_weight_decay():
    tr = trainer("method=ffl", "peers=2")
    fusion = list(tr.method.fusion.parameters())
    groups = [g for g in tr.optimizer.param_groups if any(p is fusion[0] for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == pytest.approx(1e-5)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in fusion}
    terms = tr.method.losses(record(tr, epoch=100))
    terms["kl0"].backward(retain_graph=True)
    assert no_grad(fusion) and has_grad(branch(tr, 0)) and no_grad(branch(tr, 1))  # sg(z_f)
    tr.optimizer.zero_grad(set_to_none=True)
    terms["kl_fused"].backward(retain_graph=True)
    assert has_grad(fusion) and has_grad(branch(tr, 0)[:-2])  # z_f reads the maps (not detached, as official)
    assert no_grad(tr.cohort.nets[0].classifier.parameters()) and no_grad(tr.cohort.nets[1].classifier.parameters())
    tr.optimizer.zero_grad(set_to_none=True)
    terms["ce_fused"].backward()
    assert has_grad(fusion) and has_grad(branch(tr, 0)) and has_grad(branch(tr, 1)) and has_grad(trunk(tr))


def test_ffl_independent_heterogeneous_subnetworks_and_spatial_mismatch():
    tr = trainer("method=ffl", "method.shared=false", "model=resnet8,resnet14")
    assert tr.cohort.shared == 0 and tr.method.fusion.depthwise.in_channels == 128
    assert all(torch.isfinite(v) for v in tr.train_step(next(iter(tr.train_loader))).values())
    with pytest.raises(PeerdistillError, match="spatial size; got 4x4, 2x2") as e:
        trainer("method=ffl", "method.shared=false", "model=resnet8,vgg8")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ mixers and bad values
@pytest.mark.parametrize("name,peers", [("cl_ilr", 2), ("okddip", 3), ("kdcl", 2), ("ffl", 2)])
def test_shared_mix_mixes_every_view_alike_and_trains(name, peers):
    tr = trainer(f"method={name}", f"peers={peers}", "mixer=cutmix", "mixer.prob=1.0")
    rec = record(tr)
    assert rec.views[0].mix is not None and all(v.mix is rec.views[0].mix for v in rec.views)
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("over,match", [
    (["method=okddip", "peers=2"], "needs at least 3 peers"),
    (["method=cl_ilr", "method.temperature=-1"], "temperature"),
    (["method=kdcl", "method.ensemble=best"], "ensemble"),
    (["method=okddip", "peers=3", "method.factor=0"], "factor"),
    (["method=ffl", "method.shared=false", "method.split_after=stage1"], "split_after needs shared=true"),
    (["method=cl_ilr", "method.split_after=stage3"], "cannot split"),
])
def test_bad_values_are_one_line_errors(over, match):
    with pytest.raises(PeerdistillError, match=match) as e:
        trainer(*over)
    assert "\n" not in str(e.value)


def test_rampups_use_the_integer_epoch(okddip_default):
    tr = okddip_default
    rec = record(tr)
    kl = [values(tr.method.losses(dataclasses.replace(rec, epoch=e)))["kl_leader"] for e in (0, 80)]
    assert kl[0] == pytest.approx(math.exp(-5) * kl[1], rel=1e-4)


@pytest.mark.parametrize("name", ["ffl", "kdcl"])
def test_resume_from_a_checkpoint_matches_uninterrupted_training(name, tmp_path):
    """FFL: the fusion module's BN statistics and its own optimizer group; KDCL: one augmentation draw per
    student. Stopped after epoch 1 and resumed from its checkpoint, training ends exactly where the
    uninterrupted run does (the loop without evaluation or plots, to stay fast)."""
    over = [f"method={name}", "epochs=2", "data.size=32", "mixer=cutmix", "mixer.prob=1.0",
            *(["method.rampup_epochs=1"] if name == "ffl" else [])]

    def epochs(tr: Trainer, n: int) -> Trainer:
        tr.before_training()
        for _ in range(n):
            tr.train_epoch()
            tr.epoch += 1
        return tr

    full = epochs(Trainer(load(None, [*BASE, *over]), tmp_path / "full"), 2)
    epochs(Trainer(load(None, [*BASE, *over]), tmp_path / "cut"), 1).save("last.pt")
    resumed = Trainer(load(None, [*BASE, *over]), tmp_path / "cut")
    resumed.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    epochs(resumed, 1)
    for part in ("cohort", "method"):
        a, b = getattr(full, part).state_dict(), getattr(resumed, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items()), part
