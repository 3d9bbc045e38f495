"""L-MCL (spec §3.2): structure (fresh auxiliary branches, per-(network, stage) heads, the pair
order of the code), every loss term against hand formulas with the layer-matching weights, gradient
routing, and the meta step: parameters and buffers bit-identical, only the weight network moves, the
hyper-gradient equals a finite difference of independently unrolled ``torch.optim.SGD`` steps (double
precision), the schedule, no host reads, exact resume of the weight network and its optimizer."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peerdistill.config import load
from peerdistill.data.samplers import MPerClassSampler
from peerdistill.data.views import View
from peerdistill.engine.trainer import Trainer
from peerdistill.methods import StepRecord
from peerdistill.methods.lmcl import LMCL

from .reference import as_float64, checkpoint_after_one_epoch, np_kd, np_log_softmax
from .test_mcl import hand_projection, np_supcon

from .conftest import no_host_reads

BASE = ["data.name=synthetic", "data.size=64", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=128", "method=lmcl"]
SMALL = ["data.image_size=8", "batch_size=8", "data.size=32", "data.num_classes=4", "data.val_split=0"]
T = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors and double backward


def trainer(*overrides: str) -> Trainer:
    return Trainer(load(None, [*BASE, *overrides]), out_dir=None)


def record(tr: Trainer) -> StepRecord:
    return tr.step_record(next(iter(tr.train_loader)))


def grads_in(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.any() for p in module.parameters())


def state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"c.{k}": v.clone() for k, v in tr.cohort.state_dict().items()},
            **{f"m.{k}": v.clone() for k, v in tr.method.state_dict().items()}}


# ------------------------------------------------------------------ structure
def test_branches_heads_pairs_and_the_weight_network_outside_the_optimizer():
    tr = trainer()
    m, nets = tr.method, tr.cohort.nets
    assert tr.taps == ("*",)
    assert [len(b) for b in m.branches] == [2, 2] and len(m.proj) == 6
    for net, branches in zip(nets, m.branches):
        assert [len(b.stages) for b in branches] == [2, 1]  # stage1 -> copies of stages 2, 3; stage2 -> stage 3
        copy_w = next(branches[0].stages[0].parameters())
        own_w = next(net.stages[1].parameters())
        assert copy_w.shape == own_w.shape and copy_w is not own_w and not torch.equal(copy_w, own_w)  # fresh init
    assert m.pairs.tolist()[:4] == [[0, 3], [0, 4], [0, 5], [1, 3]]  # (net a, stage k) x (net b, stage z), code order
    assert m.pairs.shape == (18, 2) and m.pairs.tolist()[9] == [3, 0]
    wn = list(m.weight_net.parameters())
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert wn and not any(p.requires_grad or id(p) in in_optim for p in wn)
    assert all(id(p) in in_optim for p in [*m.branches.parameters(), *m.proj.parameters(), *m.aggregators.parameters()])
    assert {"weight_net.proj.0.weight", "weight_momentum0"} <= set(m.state_dict())
    assert trainer("method.meta=false").method.weight_net is None


# ------------------------------------------------------------------ golden values
@pytest.mark.numerical
@pytest.mark.parametrize("meta", [True, False])
def test_losses_match_hand_formulas(meta):
    tr = trainer(f"method.meta={str(meta).lower()}")
    # the engine's record and the method's modules in float64: the formulas are checked to float64 precision
    m, rec = tr.method.double(), as_float64(record(tr))
    terms = {k: float(v.detach()) for k, v in m.losses(rec).items()}
    with torch.no_grad():
        feats, logits = m.stages(rec.outputs)  # the branches' conv stages are not re-derived by hand
    fe = [[h.detach().double().numpy() for h in fs] for fs in feats]
    zs = [[z.detach().double().numpy() for z in s] for s in logits]
    y = rec.labels.numpy()

    def ce(z):
        return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())

    def lin(layer, x):
        return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()

    aggs = []
    for a in range(2):  # stage aggregator: softmax(MLP(cat h)) weights of the stage logits
        mlp = m.aggregators[a].mlp
        g = np.exp(np_log_softmax(lin(mlp[2], np.maximum(lin(mlp[0], np.concatenate(fe[a], 1)), 0))))
        aggs.append(sum(g[:, k:k + 1] * zs[a][k] for k in range(3)))
    for a in range(2):
        assert terms[f"ce{a}"] == pytest.approx(ce(zs[a][2]), rel=1e-10)
        assert terms[f"ce_aux{a}"] == pytest.approx(ce(zs[a][0]) + ce(zs[a][1]), rel=1e-10)
        assert terms[f"ce_agg{a}"] == pytest.approx(ce(aggs[a]), rel=1e-10)
        assert terms[f"kd{a}"] == pytest.approx(sum(np_kd(zs[a][2], ag, T) for ag in aggs), rel=1e-10)
    v = [[hand_projection(m.proj[3 * a + k], feats[a][k]) for k in range(3)] for a in range(2)]
    b = len(y)
    same = np.array([[y[i] == y[j] for j in range(b)] for i in range(b)])
    pos, den = same & ~np.eye(b, dtype=bool), ~np.eye(b, dtype=bool)
    want = dict.fromkeys(("vcl", "icl", "soft_vcl", "soft_icl"), 0.0)
    for a, c in ((0, 1), (1, 0)):  # code loop: every ordered pair of nets, every pair of stages
        for k in range(3):
            for z in range(3):
                if meta:
                    u = [lin(m.weight_net.proj[3 * n + s], fe[n][s]) for n, s in ((a, k), (c, z))]
                    u = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in u]
                    w = 1 / (1 + np.exp(-(u[0] * u[1]).sum(1)))
                else:
                    w = np.ones(b)
                p, q = v[a][k], v[c][z]
                spq, sqp, spp, sqq = p @ q.T / 0.1, q @ p.T / 0.1, p @ p.T / 0.1, q @ q.T / 0.1
                want["icl"] += np_supcon(spq, pos, den, w) + np_supcon(sqp, pos, den, w)
                want["vcl"] += np_supcon(spp, pos, den, w) + np_supcon(sqq, pos, den, w)
                want["soft_icl"] += np_kd(spq, sqp, T, w) + np_kd(sqp, spq, T, w)
                want["soft_vcl"] += np_kd(spp, sqq, T, w) + np_kd(sqq, spp, T, w)
    for k, wt in {"vcl": 0.1, "icl": 0.1, "soft_vcl": 1.0, "soft_icl": 1.0}.items():
        assert terms[k] == pytest.approx(wt * want[k], rel=1e-10), k


def test_gradient_routing():
    tr = trainer()
    m, nets = tr.method, tr.cohort.nets
    terms = m.losses(record(tr))
    terms["kd0"].backward(retain_graph=True)  # target sg(agg_j): only network 0's backbone learns
    assert grads_in(nets[0].classifier) and not grads_in(nets[1]) and not grads_in(m.aggregators)
    assert not grads_in(m.branches)
    tr.optimizer.zero_grad(set_to_none=True)
    terms["ce_aux0"].backward(retain_graph=True)  # auxiliary CE: network 0's branches and trunk
    assert grads_in(m.branches[0]) and grads_in(nets[0].stages[0]) and not grads_in(m.branches[1])
    assert not grads_in(nets[0].classifier) and not grads_in(nets[1])
    tr.optimizer.zero_grad(set_to_none=True)
    terms["ce_agg1"].backward(retain_graph=True)
    assert grads_in(m.aggregators[1]) and not grads_in(m.aggregators[0])
    tr.optimizer.zero_grad(set_to_none=True)
    (terms["vcl"] + terms["icl"] + terms["soft_vcl"] + terms["soft_icl"]).backward()
    assert all(grads_in(h) for h in m.proj) and grads_in(m.branches[1]) and not grads_in(m.aggregators)
    assert all(p.grad is None for p in m.weight_net.parameters())  # never trained by the main loss


# ------------------------------------------------------------------ meta step
def test_meta_step_leaves_networks_bit_identical_and_moves_only_the_weight_network():
    tr = trainer(*SMALL)
    rec = record(tr)
    before = state(tr)
    tr.method.update(rec)  # rec.step = 0: batch 0 of the epoch runs a meta step
    after = state(tr)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    weight = {k for k in before if k.startswith(("m.weight_net.", "m.weight_momentum"))}
    assert changed == weight and len(weight) == 24  # 6 Linear layers x (weight, bias), and their momenta
    assert any(k.endswith("running_mean") for k in before) and all(p.grad is None for p in tr.module.parameters())


def _unrolled_ce(method, x: torch.Tensor, y: torch.Tensor, lr: float, wd: float, shift: list[torch.Tensor]) -> float:
    """CE after 2 + 1 steps of torch.optim.SGD on copies of the networks and heads, weight net + shift."""
    m = copy.deepcopy(method)  # copies the cohort too (the method holds it in _unrolled)
    with torch.no_grad():
        for p, d in zip(m.weight_net.parameters(), shift):
            p += d
    model = m._unrolled
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)

    def ce() -> torch.Tensor:
        _, logits, _ = model(x, project=False)
        return sum(-torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean() for zs in logits for z in zs)

    for t in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)  # a parameter the objective misses still decays (as MetaSGD)
        if t < 2:
            feats, _, v = model(x)
            loss = sum(m.contrast(v, m.weight_net([h for fs in feats for h in fs]), y).values())
        else:
            loss = ce()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(ce())


def test_hypergradient_matches_finite_difference_in_double_precision():
    # gamma = lam = 0: the soft terms' targets are stop-gradients, which the hyper-gradient (as the code's)
    # holds constant through the unrolled steps while a finite difference sees them move (docs/methods.md)
    tr = trainer(*SMALL, "method.gamma=0", "method.lam=0")
    batch = next(iter(tr.train_loader))
    x = tr.method.make_views(batch, tr.view_context(tr.gen)).peers[0].x.double()
    tr.module.double()
    view = View(x, batch.labels, batch.index)
    lr, wd = 0.1, 5e-4
    rec = StepRecord([view, view], [], [], 4, lr=lr, weight_decay=wd)
    g = tr.method.hypergradient(rec, lr)
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in tr.method.weight_net.parameters()]
    analytic = sum(float((g[k] * d).sum()) for (k, _), d in zip(tr.method.weight_net.named_parameters(), u))
    # F is smooth at this scale (float64: the difference quotient's rounding error is ~1e-9 relative); on this
    # batch ReLU patterns of the tiny net already flip at 1e-6 (quotient 768 against -1.09) and 1e-5
    eps = 1e-7
    plus = _unrolled_ce(tr.method, x, batch.labels, lr, wd, [eps * d for d in u])
    minus = _unrolled_ce(tr.method, x, batch.labels, lr, wd, [-eps * d for d in u])
    fd = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_meta_step_runs_every_meta_freq_batches_of_an_epoch(monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(LMCL, "meta_step", lambda self, rec: seen.append(rec.step))
    tr = trainer("method.meta_freq=3", "data.val_split=0")
    assert tr.steps_per_epoch == 4
    for _ in range(2):
        tr.train_epoch()
        tr.epoch += 1
    assert seen == [0, 3, 4, 7]  # code: ``batch_idx % meta_freq == 0`` within each epoch


def test_meta_step_never_reads_a_tensor_back_to_the_host(monkeypatch):
    tr = trainer(*SMALL)
    rec = record(tr)
    tr.method.meta_step(rec)  # first call outside the guard
    with no_host_reads("the meta step"):
        tr.method.meta_step(rec)


def test_weight_network_and_its_optimizer_resume_exactly(tmp_path):
    cfg = [*SMALL, "epochs=2", "method.meta_freq=2", "optim.lr=0.05", "optim.weight_decay=0.001"]
    full = trainer(*cfg)
    init = {k: v.clone() for k, v in full.method.weight_net.state_dict().items()}
    full.fit()
    assert any(not torch.equal(init[k], v) for k, v in full.method.weight_net.state_dict().items())
    checkpoint_after_one_epoch(trainer(*cfg), tmp_path / "last.pt")
    resumed = trainer(*cfg)
    resumed.load(tmp_path / "last.pt")
    resumed.fit()
    a, b = state(full), state(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_eval_heads_cover_branches_and_aggregators():
    tr = trainer()
    tr.module.eval()
    with torch.no_grad():
        outs = tr.cohort([torch.randn(4, 3, 16, 16)] * 2, ("*",))
        heads = tr.method.eval_heads(outs)
    assert {"peer0", "peer1", "ensemble", "aux0_stage1", "aux1_stage2", "agg0", "agg1"} <= set(heads)
    assert all(h.shape == (4, 5) and torch.isfinite(h).all() for h in heads.values())
    assert torch.allclose(F.log_softmax(heads["peer0"], 1), F.log_softmax(outs[0].logits, 1))


# ------------------------------------------------------------------ memory bank (the ImageNet code)
BANK = ["method.contrast=bank", "method.neg_k=6"]


@pytest.mark.numerical
@pytest.mark.parametrize("vcl_bank,meta", [("own", True), ("code", False)])
def test_bank_form_matches_hand_formulas_and_stores_the_final_stage(vcl_bank, meta):
    """imagenet_sup_layer_mcl_meta_loss.py on a tiny cohort, written out one (network, stage) pair at a
    time: for nets (a, b), stages (k, z), p = v_ak, q = v_bz, weight w of the pair: ICL l_w(M_a[idx] q) +
    l_w(M_b[idx] p), positives own + same-class index; VCL over idx[:, 1:] with the same-class index the
    positive, p against M_a and q against M_b (``own``) or M_a (``code``, the code's ``memory_a`` twice);
    soft terms both ways; the bank update uses each network's final-stage embedding only."""
    tr = trainer(*BANK, f"method.vcl_bank={vcl_bank}", f"method.meta={str(meta).lower()}")
    m = tr.method
    assert (m.tau, m.weights["vcl"], m.weights["icl"], m.meta_freq) == (0.07, 0.01, 0.01, 500)  # ImageNet code
    assert m.banks.shape == (2, len(tr.data.train), 128) and not isinstance(m.needs.sampler, MPerClassSampler)
    raw = record(tr)
    before = m.banks.clone()
    m, rec = m.double(), as_float64(raw)
    terms = {k: float(v.detach()) for k, v in m.losses(rec).items()}
    with torch.no_grad():
        feats, _ = m.stages(rec.outputs)
    fe = [[h.detach().double().numpy() for h in fs] for fs in feats]
    v = [[hand_projection(m.proj[3 * a + k], feats[a][k]) for k in range(3)] for a in range(2)]
    idx = m.draw_indices(rec.index, rec.step).numpy()
    assert idx.shape == (len(rec.index), 8)
    mem = before.double().numpy()

    def scores(bank: int, e: np.ndarray, rows: np.ndarray) -> np.ndarray:  # (B, K): M_bank[rows[b, j]] . e_b / tau
        return np.array([[mem[bank][rows[i, j]] @ e[i] for j in range(rows.shape[1])] for i in range(len(e))]) / 0.07

    def lin(layer, x):
        return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()

    b = len(idx)
    pos_x, pos_w = np.zeros((b, 8), bool), np.zeros((b, 7), bool)
    pos_x[:, :2], pos_w[:, 0] = True, True
    want = dict.fromkeys(("vcl", "icl", "soft_vcl", "soft_icl"), 0.0)
    for a, c in ((0, 1), (1, 0)):
        for k in range(3):
            for z in range(3):
                w = np.ones(b)
                if meta:
                    u = [lin(m.weight_net.proj[3 * n + s], fe[n][s]) for n, s in ((a, k), (c, z))]
                    u = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in u]
                    w = 1 / (1 + np.exp(-(u[0] * u[1]).sum(1)))
                p, q = v[a][k], v[c][z]
                lij, lji = scores(a, q, idx), scores(c, p, idx)
                ia, ib = scores(a, p, idx[:, 1:]), scores(c if vcl_bank == "own" else a, q, idx[:, 1:])
                want["icl"] += np_supcon(lij, pos_x, ~np.zeros_like(pos_x), w) + np_supcon(lji, pos_x, ~np.zeros_like(pos_x), w)
                want["soft_icl"] += np_kd(lij, lji, T, w) + np_kd(lji, lij, T, w)
                want["vcl"] += np_supcon(ia, pos_w, ~np.zeros_like(pos_w), w) + np_supcon(ib, pos_w, ~np.zeros_like(pos_w), w)
                want["soft_vcl"] += np_kd(ia, ib, T, w) + np_kd(ib, ia, T, w)
    for k, wt in {"vcl": 0.01, "icl": 0.01, "soft_vcl": 1.0, "soft_icl": 1.0}.items():
        assert terms[k] == pytest.approx(wt * want[k], rel=1e-10), k
    if meta:
        return
    m.update(rec)
    for n in range(2):  # M_n[i] <- normalise(0.5 M_n[i] + 0.5 v_n,final,i)
        new = 0.5 * mem[n][rec.index.numpy()] + 0.5 * v[n][2]
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        assert np.allclose(m.banks[n][rec.index].numpy(), new, rtol=0, atol=1e-12)
    others = torch.ones(len(tr.data.train), dtype=torch.bool)
    others[rec.index] = False
    assert torch.equal(m.banks[:, others], before[:, others].double())


def test_bank_form_meta_step_moves_the_weight_network_and_the_batch_rows_only():
    """The step's bank update, then the meta step on the same draws; the virtual steps leave the banks
    alone (the code's inner objective also writes its memory: a departure, docs/methods.md)."""
    tr = trainer(*SMALL, *BANK)
    rec = record(tr)
    tr.method.losses(rec)
    before = state(tr)
    tr.method.update(rec)  # rec.step = 0: a meta step
    after = state(tr)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith(("m.weight_net.", "m.weight_momentum"))} | {"m.banks"}
    moved = (after["m.banks"] != before["m.banks"]).any(2).any(0)
    assert torch.equal(moved.nonzero().flatten().sort().values, rec.index.unique().sort().values)
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert {"vcl", "icl", "soft_vcl", "soft_icl"} <= set(terms) and all(torch.isfinite(t) for t in terms.values())


def test_bank_form_refuses_batch_only_options_and_mixers():
    from peerdistill.errors import PeerdistillError
    for bad in ("method.instance_positive=true", "method.sampling=per_batch"):
        with pytest.raises(PeerdistillError, match="contrast=batch"):
            trainer(*BANK, bad)
    with pytest.raises(PeerdistillError, match="contrast=bank"):
        trainer("method.vcl_bank=code")
    with pytest.raises(PeerdistillError, match="does not support mixers"):
        trainer(*BANK, "mixer=cutmix")
    assert (trainer().method.tau, trainer().method.meta_freq) == (0.1, 50)  # the in-batch defaults stay the CIFAR code's
