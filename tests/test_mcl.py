"""MCL (spec §3.1): SupCon and the four contrastive terms against hand-written formulas (masks
written out by hand), the code's in-batch masks and the instance-positive option, logit-distillation
conventions, gradient routing, m-per-class batches, MCL(x4) sharing, and the memory bank (update,
sampling, values, exact resume). Golden values use plain numpy / torch, never the library's helpers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from peerdistill.config import load
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.data.samplers import MPerClassSampler
from peerdistill.methods.contrastive import bank_logits, batch_masks, mutual_contrast, supcon

from .conftest import no_host_reads
from .reference import as_float64, checkpoint_after_one_epoch, close32, np_kd

BASE = ["data.name=synthetic", "data.size=64", "data.image_size=16", "data.num_classes=5", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=128", "method=mcl"]
TAU, T = 0.1, 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors and double backward


def trainer(*overrides: str) -> Trainer:
    return Trainer(load(None, [*BASE, *overrides]), out_dir=None)


def record(tr: Trainer):
    return tr.step_record(next(iter(tr.train_loader)))


# ------------------------------------------------------------------ hand-written reference maths
def np_supcon(s: np.ndarray, pos: np.ndarray, den: np.ndarray, w: np.ndarray | None = None) -> float:
    """-(1/B) sum_i w_i (1/|P_i|) sum_j P_ij (S_ij - log sum_k D_ik exp S_ik), one row at a time."""
    total = 0.0
    for i in range(s.shape[0]):
        log_z = np.log(sum(np.exp(s[i, k]) for k in range(s.shape[1]) if den[i, k]))
        mean_pos = sum(s[i, j] - log_z for j in range(s.shape[1]) if pos[i, j]) / pos[i].sum()
        total += (1.0 if w is None else w[i]) * mean_pos
    return -total / s.shape[0]


def np_mcl_terms(v: np.ndarray, y: np.ndarray, instance_positive: bool = False) -> dict[str, float]:
    """spec §3.1 with the masks spelled out element by element."""
    n, b = v.shape[:2]
    same = np.array([[y[i] == y[j] for j in range(b)] for i in range(b)])
    eye = np.eye(b, dtype=bool)
    p_self, d_self = same & ~eye, ~eye
    p_x, d_x = (same, np.ones((b, b), bool)) if instance_positive else (p_self, d_self)
    s = {(a, c): v[a] @ v[c].T / TAU for a in range(n) for c in range(n)}
    out = {"vcl": sum(np_supcon(s[m, m], p_self, d_self) for m in range(n)), "icl": 0.0, "soft_icl": 0.0,
           "soft_vcl": sum(np_kd(s[a, a], s[c, c], T) for a in range(n) for c in range(n) if a != c)}
    for a, c in itertools.combinations(range(n), 2):
        out["icl"] += np_supcon(s[a, c], p_x, d_x) + np_supcon(s[c, a], p_x, d_x)
        out["soft_icl"] += np_kd(s[a, c], s[c, a], T) + np_kd(s[c, a], s[a, c], T)
    return out


def unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def hand_projection(head, emb: torch.Tensor) -> np.ndarray:
    """Linear -> ReLU -> Linear -> L2-normalise, from the head's weights."""
    l1, l2 = head.net[0], head.net[2]
    e = emb.detach().double().numpy()
    h = np.maximum(e @ l1.weight.detach().double().numpy().T + l1.bias.detach().double().numpy(), 0)
    h = h @ l2.weight.detach().double().numpy().T + l2.bias.detach().double().numpy()
    return h / np.linalg.norm(h, axis=1, keepdims=True)


# ------------------------------------------------------------------ golden values
def test_masks_are_the_codes_and_the_instance_positive_option():
    y = torch.tensor([2, 2, 0, 0, 2])
    pos, den = batch_masks(y)
    assert pos.tolist() == [[0, 1, 0, 0, 1], [1, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert den.tolist() == [[0, 1, 1, 1, 1], [1, 0, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 1, 0]]
    pos, den = batch_masks(y, include_self=True)
    assert pos.tolist() == [[1, 1, 0, 0, 1], [1, 1, 0, 0, 1], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert bool(den.all())


@pytest.mark.numerical
def test_supcon_matches_hand_formula_with_handwritten_masks():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 4, generator=g, dtype=torch.float64) * 3
    pos = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], bool)  # labels 0 0 1 1
    den = ~np.eye(4, dtype=bool)
    w = torch.rand(4, generator=g, dtype=torch.float64)
    got = supcon(s, torch.from_numpy(pos), torch.from_numpy(den))
    assert float(got) == pytest.approx(np_supcon(s.numpy(), pos, den), rel=1e-10)
    got = supcon(s, torch.from_numpy(pos), torch.from_numpy(den), w)
    assert float(got) == pytest.approx(np_supcon(s.numpy(), pos, den, w.numpy()), rel=1e-10)


@pytest.mark.numerical
@pytest.mark.parametrize("instance_positive", [False, True])
def test_four_terms_match_hand_formulas(instance_positive):
    g = torch.Generator().manual_seed(1)
    v, y = unit(g, 3, 6, 5), torch.tensor([0, 1, 0, 2, 1, 2])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    got = mutual_contrast(v, pairs, y, TAU, T, vcl_once=True, instance_positive=instance_positive)
    want = np_mcl_terms(v.numpy(), y.numpy(), instance_positive)
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], rel=1e-12), k  # float64 throughout
    if instance_positive:  # the option really changes ICL, and only ICL
        base = mutual_contrast(v, pairs, y, TAU, T, vcl_once=True)
        assert abs(float(base["icl"]) - float(got["icl"])) > 1e-3
        assert float(base["vcl"]) == pytest.approx(float(got["vcl"]), rel=1e-12)


def test_default_icl_ignores_the_other_networks_view_of_the_same_image():
    """Code quirk: the cross-network diagonal is neither positive nor negative, so moving b's embedding of
    image i changes nothing in the loss rows anchored at a_i (rows j != i still see it)."""
    g = torch.Generator().manual_seed(2)
    v, y = unit(g, 2, 6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    pos, den = batch_masks(y)
    row0 = lambda vv: supcon((vv[0] @ vv[1].T / TAU)[:1], pos[:1], den[:1])  # noqa: E731
    v2 = v.clone()
    v2[1, 0] = unit(g, 4)
    assert float(row0(v2)) == pytest.approx(float(row0(v)), rel=1e-12)
    pos, den = batch_masks(y, include_self=True)
    assert abs(float(supcon((v2[0] @ v2[1].T / TAU)[:1], pos[:1], den[:1]))
               - float(supcon((v[0] @ v[1].T / TAU)[:1], pos[:1], den[:1]))) > 1e-6


@pytest.mark.numerical
def test_soft_terms_detach_the_target_side():
    g = torch.Generator().manual_seed(3)
    v0 = unit(g, 2, 6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pairs = torch.tensor([[0, 1]])
    for term in ("soft_vcl", "soft_icl"):
        v = v0.clone().requires_grad_(True)
        got = torch.autograd.grad(mutual_contrast(v, pairs, y, TAU, T, (term,))[term], v)[0]
        u = v0.clone().requires_grad_(True)
        s = {(a, c): u[a] @ u[c].T / TAU for a in range(2) for c in range(2)}

        def kl(student, teacher, detach=True):
            lt = torch.log_softmax((teacher.detach() if detach else teacher) / T, 1)
            ls = torch.log_softmax(student / T, 1)
            return T * T * (lt.exp() * (lt - ls)).sum(1).mean()

        def hand(detach=True):
            a, b = ((0, 0), (1, 1)) if term == "soft_vcl" else ((0, 1), (1, 0))
            return kl(s[a], s[b], detach) + kl(s[b], s[a], detach)

        want = torch.autograd.grad(hand(), u, retain_graph=True)[0]
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), term  # float64 throughout
        wrong = torch.autograd.grad(hand(detach=False), u)[0]
        assert not torch.allclose(got, wrong, rtol=1e-2, atol=1e-3), term


# ------------------------------------------------------------------ through the method
@pytest.mark.numerical
@pytest.mark.parametrize("peers", [2, 3])
def test_method_terms_and_logit_distill_conventions(peers):
    tr = trainer(f"peers={peers}", "method.logit_distill=true")
    rec = record(tr)
    terms = tr.method.losses(rec)
    # the formulas in float64 (the engine's record and the heads moved to float64): exact on any CPU
    exact = tr.method.double().losses(as_float64(rec))
    tr.method.float()
    v = np.stack([hand_projection(h, o.embedding) for h, o in zip(tr.method.proj, rec.outputs)])
    want = np_mcl_terms(v, rec.labels.numpy())
    weight = {"vcl": 0.1, "icl": 0.1, "soft_vcl": 1.0, "soft_icl": 1.0}
    for k, w in weight.items():
        assert float(exact[k].detach()) == pytest.approx(w * want[k], rel=1e-10), k
    z = [o.logits.detach().double().numpy() for o in rec.outputs]
    z_bar = np.mean(z, axis=0)
    students = [0, 1] if peers == 2 else [peers - 1]  # code: both of a pair, else only the last
    assert sorted(k for k in terms if k.startswith("kd")) == [f"kd{i}" for i in students]
    for i in students:
        assert float(exact[f"kd{i}"].detach()) == pytest.approx(np_kd(z[i], z_bar, T), rel=1e-10)
    # the ensemble target is detached: the last net's KD reaches only that net
    terms[f"kd{peers - 1}"].backward(retain_graph=True)
    nets = tr.cohort.nets
    assert all(p.grad is None or not p.grad.any() for i in range(peers - 1) for p in nets[i].parameters())
    assert any(p.grad is not None and p.grad.any() for p in nets[peers - 1].parameters())
    assert all(p.grad is None for p in tr.method.proj.parameters())


def test_contrastive_terms_route_gradients_to_heads_and_trunks_not_classifiers():
    tr = trainer("peers=2")
    terms = tr.method.losses(record(tr))
    assert set(terms) == {"ce0", "ce1", "vcl", "icl", "soft_vcl", "soft_icl"}
    (terms["vcl"] + terms["icl"] + terms["soft_vcl"] + terms["soft_icl"]).backward()
    for net, head in zip(tr.cohort.nets, tr.method.proj):
        assert all(p.grad is not None and p.grad.any() for p in head.parameters())
        assert all(p.grad is None for p in net.classifier.parameters())
        assert any(p.grad is not None and p.grad.any() for p in net.stages[0].parameters())


def test_zero_weight_skips_its_term():
    tr = trainer("method.alpha=0", "method.lam=0")
    assert set(tr.method.losses(record(tr))) == {"ce0", "ce1", "icl", "soft_vcl"}


def test_batches_are_m_per_class():
    for classes, exact in ((5, False), (10, True)):  # 8 groups of 2 per batch: fewer / more classes than groups
        tr = trainer(f"data.num_classes={classes}", "data.size=200")
        n = 0
        for batch in tr.train_loader:
            counts = torch.bincount(batch.labels, minlength=classes)
            assert bool((counts % 2 == 0).all()), counts
            if exact:
                assert set(counts.tolist()) <= {0, 2}, counts
            n += 1
        assert n == len(tr.train_loader) > 3
    assert trainer("method.contrast=bank").method.needs.sampler.describe() == "random"  # the ImageNet code


def test_per_batch_sampling_draws_afresh_for_every_batch_as_the_code():
    """The code's MPerClassSampler draws 2 images of batch/2 classes afresh for every batch, N // B batches an
    epoch: the same make-up, but images repeat within an epoch; ours covers every image once."""
    labels = np.repeat(np.arange(10), 20)  # 200 images of 10 classes
    for classes in (10, 2):  # more classes than the 4 groups of a batch of 8, and fewer
        lab = labels % classes
        cover = MPerClassSampler(2).epoch(lab, 8, 1, seed=0, epoch=0)
        drawn = MPerClassSampler(2, per_batch=True).epoch(lab, 8, 1, seed=0, epoch=0)
        assert drawn.shape == (25, 8) and len(set(cover.flatten().tolist())) == cover.numel()
        assert len(set(drawn.flatten().tolist())) < drawn.numel()  # a fresh draw per batch repeats images
        for row in drawn:
            counts = np.bincount(lab[row.numpy()], minlength=classes)
            assert set(counts.tolist()) <= ({0, 2} if classes == 10 else {0, 2, 4, 6, 8}), counts
        assert not torch.equal(drawn, MPerClassSampler(2, per_batch=True).epoch(lab, 8, 1, seed=0, epoch=1))
    tr = trainer("method.sampling=per_batch", "data.num_classes=10", "data.size=200")
    assert tr.method.needs.sampler.per_batch and "drawn per batch" in tr.method.needs.sampler.describe()
    assert all(bool((torch.bincount(b.labels) % 2 == 0).all()) for b in tr.train_loader)
    with pytest.raises(PeerdistillError, match="contrast=batch"):
        trainer("method.contrast=bank", "method.sampling=per_batch")


@pytest.mark.numerical
def test_logit_distill_imagenet_rule_distils_the_last_net_from_the_undetached_mean():
    """main_imagenet.py: only the last network distils, from the mean of the logits, not detached; it is
    the default of the bank form (the ImageNet code), main_cifar.py's rule that of the in-batch form."""
    assert trainer("method.contrast=bank").method.logit_rule == "imagenet"
    assert trainer().method.logit_rule == "cifar"
    tr = trainer("peers=2", "method.logit_distill=true", "method.logit_rule=imagenet", "method.alpha=0",
                 "method.beta=0", "method.gamma=0", "method.lam=0")
    rec = record(tr)
    terms = tr.method.losses(rec)
    assert sorted(terms) == ["ce0", "ce1", "kd1"]  # a pair, yet only the last net distils
    z = [o.logits.detach().double().numpy() for o in rec.outputs]
    exact = tr.method.double().losses(as_float64(rec))["kd1"]
    tr.method.float()
    assert float(exact.detach()) == pytest.approx(np_kd(z[1], (z[0] + z[1]) / 2, T), rel=1e-10)
    terms["kd1"].backward()  # the mean is not detached: the KD trains network 0 too
    assert all(any(p.grad is not None and p.grad.any() for p in net.parameters()) for net in tr.cohort.nets)


def test_mcl_x4_shares_stem_and_first_stage_and_heterogeneous_pairs_work():
    tr = trainer("peers=4", "method.share=stage1")
    nets = tr.cohort.nets
    assert tr.cohort.shared == 1 and all(n.stem is nets[0].stem and n.stages[0] is nets[0].stages[0] for n in nets)
    assert all(n.stages[1] is not nets[0].stages[1] for n in nets[1:])
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert {"ce3", "vcl", "icl"} <= set(terms) and all(torch.isfinite(t) for t in terms.values())
    tr = trainer("model=resnet8,resnet8x4")
    assert [h.net[0].in_features for h in tr.method.proj] == [64, 256]
    assert all(torch.isfinite(t) for t in tr.train_step(next(iter(tr.train_loader))).values())


def test_eval_heads_include_both_ensembles():
    tr = trainer("peers=3")
    tr.module.eval()
    with torch.no_grad():
        outs = tr.cohort([torch.randn(4, 3, 16, 16)] * 3)
    heads = tr.method.eval_heads(outs)
    assert {"peer0", "peer1", "peer2", "ensemble", "logit_ensemble"} <= set(heads)
    z = torch.stack([o.logits.double() for o in outs])
    assert close32(heads["logit_ensemble"], z.mean(0), z.abs().amax(0))
    assert close32(heads["ensemble"].exp(), z.softmax(2).mean(0), 1.0)  # probabilities: magnitude 1


# ------------------------------------------------------------------ memory bank
BANK = ["method.contrast=bank", "method.neg_k=6"]


def test_bank_sampling_positive_and_negatives():
    tr = trainer(*BANK, "method.neg_k=50")
    m, labels = tr.method, tr.method.cls_labels
    index = torch.arange(0, 40, 3)
    idx = m.draw_indices(index, step=7)
    assert idx.shape == (len(index), 52) and torch.equal(idx[:, 0], index)
    assert bool((idx[:, 1] != index).all()) and torch.equal(labels[idx[:, 1]], labels[index])  # same class, not self
    assert bool((labels[idx[:, 2:]] != labels[index].unsqueeze(1)).all())  # negatives: other classes
    assert torch.equal(idx, m.draw_indices(index, step=7))  # a function of the step: resume replays it
    assert not torch.equal(idx, m.draw_indices(index, step=8))
    assert int(idx[:, 2:].max()) < len(labels) and int(idx.min()) >= 0


@pytest.mark.numerical
@pytest.mark.parametrize("bank_rows,neg", [(8, 6), (5000, 6)])  # the scored-bank route, the gather route
def test_bank_logits_routes_agree_with_the_definition(bank_rows, neg):
    g = torch.Generator().manual_seed(0)
    v, banks = torch.randn(2, 5, 4, generator=g), torch.randn(2, bank_rows, 4, generator=g)
    idx = torch.randint(0, bank_rows, (5, 2 + neg), generator=g)
    mem, vv = banks.double().numpy()[:, idx.numpy()], v.double().numpy()
    want, mag = np.einsum("ibkf,jbf->ijbk", mem, vv), np.einsum("ibkf,jbf->ijbk", np.abs(mem), np.abs(vv))
    assert close32(bank_logits(v, banks, idx), want, mag)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # similarities stay float32 under the default precision
        assert close32(bank_logits(v, banks, idx), want, mag)


@pytest.mark.numerical
def test_bank_terms_and_momentum_update_with_renormalisation():
    tr = trainer(*BANK)
    m = tr.method
    assert m.tau == 0.07 and m.banks.shape == (2, len(tr.data.train), 128)
    s = 1 / np.sqrt(128 / 3)
    assert float(m.banks.abs().max()) <= s and float(m.banks.abs().max()) > 0.9 * s  # U(-s, s) init
    rec = record(tr)
    before = m.banks.clone()
    terms = m.double().losses(as_float64(rec))  # the formulas in float64: exact on any CPU
    idx = m.draw_indices(rec.index, rec.step).numpy()
    v = [hand_projection(h, o.embedding) for h, o in zip(m.proj, rec.outputs)]
    mem = before.double().numpy()
    lg = {(i, j): np.einsum("bkf,bf->bk", mem[i][idx], v[j]) / 0.07 for i in range(2) for j in range(2)}
    pos_x = np.zeros_like(lg[0, 1], bool)
    pos_x[:, :2] = True  # own index + the same-class index
    pos_w = np.zeros_like(lg[0, 0][:, 1:], bool)
    pos_w[:, 0] = True
    want = {"icl": np_supcon(lg[0, 1], pos_x, ~np.zeros_like(pos_x)) + np_supcon(lg[1, 0], pos_x, ~np.zeros_like(pos_x)),
            "soft_icl": np_kd(lg[0, 1], lg[1, 0], T) + np_kd(lg[1, 0], lg[0, 1], T),
            "vcl": sum(np_supcon(lg[k, k][:, 1:], pos_w, ~np.zeros_like(pos_w)) for k in range(2)),
            "soft_vcl": np_kd(lg[0, 0][:, 1:], lg[1, 1][:, 1:], T) + np_kd(lg[1, 1][:, 1:], lg[0, 0][:, 1:], T)}
    for k, w in {"vcl": 0.1, "icl": 0.1, "soft_vcl": 1.0, "soft_icl": 1.0}.items():
        assert float(terms[k].detach()) == pytest.approx(w * want[k], rel=1e-10), k
    m.update(rec)
    for k in range(2):
        new = 0.5 * mem[k][rec.index.numpy()] + 0.5 * v[k]
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        assert np.allclose(m.banks[k][rec.index].numpy(), new, rtol=0, atol=1e-12)
    others = torch.ones(len(tr.data.train), dtype=torch.bool)
    others[rec.index] = False
    assert torch.equal(m.banks[:, others], before[:, others].double())  # only the batch's rows move


def test_bank_refuses_a_mixer_the_batch_form_takes_it():
    with pytest.raises(PeerdistillError, match="as configured does not support mixers"):
        trainer(*BANK, "mixer=cutmix")
    assert trainer("mixer=cutmix").mixer is not None


def test_bank_is_checkpointed_and_resume_is_exact(tmp_path):
    cfg = [*BANK, "epochs=2", "data.val_split=0"]
    full = trainer(*cfg)
    full.fit()
    part = checkpoint_after_one_epoch(trainer(*cfg), tmp_path / "last.pt")
    resumed = trainer(*cfg)
    assert not torch.equal(resumed.method.banks, part.method.banks)  # the test can fail
    resumed.load(tmp_path / "last.pt")
    assert torch.equal(resumed.method.banks, part.method.banks)
    resumed.fit()
    a = {**full.cohort.state_dict(), **full.method.state_dict()}
    b = {**resumed.cohort.state_dict(), **resumed.method.state_dict()}
    assert "banks" in a and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not torch.equal(full.method.banks, trainer(*cfg).method.banks)  # the banks did move


def test_bank_step_never_reads_a_tensor_back_to_the_host(monkeypatch):
    tr = trainer(*BANK)
    batch = next(iter(tr.train_loader))
    tr.train_step(batch)
    with no_host_reads("a bank step"):
        for _ in range(3):  # draw, bank logits, update
            tr.train_step(batch)
