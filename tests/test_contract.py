"""The method contract's general capabilities, exercised by small methods defined here: views per peer,
shared and per-view mixing with their peer targets, extra inputs, batch samplers, the before-training
hook, method parameter groups, add-ons, gradient accumulation and clipping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peerdistill.config import load
from peerdistill.data.base import ImageSet
from peerdistill.data.loader import DeviceLoader, DeviceSet
from peerdistill.data.samplers import MPerClassSampler, PairSampler, Sampler
from peerdistill.data.views import Extra, View, Views
from peerdistill.run import train
from peerdistill.engine.trainer import Trainer
from peerdistill.methods import ADDONS, METHODS, AddOn, Method, Needs, ParamGroup

from .reference import close32

BASE = ["data.name=synthetic", "data.size=64", "data.image_size=16", "data.num_classes=4", "model=resnet8",
        "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32",
        "data.eval_batch_size=64", "data.val_split=0"]


def trainer(*over: str) -> Trainer:
    return Trainer(load(None, [*BASE, *over]), None)


class _Probe(Method):
    """CE per peer, with configurable needs; records what the engine handed it."""

    def __init__(self, views: str = "shared", mix: str = "shared", peer_targets: str = "own",
                 topology: str = "independent", sampler: str = "random", pretrain_steps: int = 0,
                 fusion_wd: float = -1.0) -> None:
        super().__init__()
        samplers = {"random": Sampler(), "m2": MPerClassSampler(2), "pairs": PairSampler()}
        self.needs = Needs(min_peers=1, views=views, mix=mix, peer_targets=peer_targets, topology=topology,
                           sampler=samplers[sampler], ema_decay=0.9 if pretrain_steps else None)
        self.pretrain_steps, self.fusion_wd = pretrain_steps, fusion_wd
        self.fusion = nn.Linear(2, 2)
        self.register_buffer("pretrained", torch.zeros((), dtype=torch.long))
        self.seen = []

    def before_training(self, ctx):
        if not self.pretrain_steps:
            return
        opt = ctx.sgd_optimizer(ctx.ema.parameters(), ctx.base_lr / 100)
        ctx.ema.requires_grad_(True)
        for i, views in enumerate(ctx.batches()):
            outs = ctx.ema([v.x for v in views.peers], ctx.taps)
            loss = sum(F.cross_entropy(o.logits, v.labels) for o, v in zip(outs, views.peers))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i + 1 == self.pretrain_steps:
                break
        ctx.ema.requires_grad_(False)
        self.pretrained += 1

    def losses(self, rec):
        self.seen.append(rec)
        terms = {f"ce{i}": rec.ce(o.logits, i) for i, o in enumerate(rec.outputs)}
        terms["fusion"] = 0.0 * self.fusion.weight.sum()
        return terms

    def param_groups(self):
        return [ParamGroup(list(self.fusion.parameters()), self.fusion_wd)] if self.fusion_wd >= 0 else []


class _DoubleCE(AddOn):
    """A test add-on: adds each peer's CE once more, through the method's dropout features."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def losses(self, rec, method):
        return {f"again{i}": self.weight * rec.ce(fh.head(fh.feature), i)
                for i, fh in enumerate(method.feature_heads(rec))}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The test components exist only while this module's tests run (other modules parametrize over
    every registered method)."""
    METHODS._items["_probe"], ADDONS._items["_double_ce"] = _Probe, _DoubleCE
    yield
    del METHODS._items["_probe"], ADDONS._items["_double_ce"]


def test_per_peer_views_are_independent_augmentations_of_the_same_images():
    tr = trainer("method=_probe", "method.views=per_peer", "peers=3")
    rec = tr.step_record(next(iter(tr.train_loader)))
    xs = [v.x for v in rec.views]
    assert all(torch.equal(v.labels, rec.views[0].labels) and torch.equal(v.index, rec.index) for v in rec.views)
    assert not torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2])


def test_branched_trunk_runs_once_per_distinct_view():
    for views, expected in (("shared", 1), ("per_peer", 3)):
        tr = trainer("method=_probe", f"method.views={views}", "method.topology=branched", "peers=3")
        calls = []
        handle = tr.cohort.nets[0].stem.register_forward_hook(lambda *a: calls.append(1))
        tr.step_record(next(iter(tr.train_loader)))
        handle.remove()
        assert len(calls) == expected


def test_shared_mix_is_one_draw_for_every_view_and_per_view_mix_differs():
    tr = trainer("method=_probe", "method.views=per_peer", "peers=2", "mixer=cutmix", "mixer.prob=1.0")
    rec = tr.step_record(next(iter(tr.train_loader)))
    assert rec.views[0].mix is rec.views[1].mix is not None
    tr = trainer("method=_probe", "method.mix=per_view", "peers=2", "mixer=cutmix", "mixer.prob=1.0")
    rec = tr.step_record(next(iter(tr.train_loader)))
    a, b = rec.views[0].mix, rec.views[1].mix
    assert a is not b and not (torch.equal(a.perms, b.perms) and torch.equal(a.weights, b.weights))


@pytest.mark.numerical
@pytest.mark.parametrize("mode", ["own", "rerun", "components"])
def test_peer_targets_refer_to_the_image_the_student_saw(mode):
    tr = trainer("method=_probe", "method.mix=per_view", f"method.peer_targets={mode}", "peers=2",
                 "mixer=mixup", "mixer.prob=1.0")
    tr.module.eval()  # BN in eval mode: a re-run gives exactly the same logits as a fresh forward
    rec = tr.step_record(next(iter(tr.train_loader)))
    with torch.no_grad():
        z_on_v0, z_own = (tr.cohort.nets[1](rec.views[i].x) for i in (0, 1))
    p1_on_v0, p1_own = F.softmax(z_on_v0 / 2.0, 1), F.softmax(z_own / 2.0, 1)
    # re-run forwards round within float32 of the logits' size; softened probabilities move by that / T
    mag = 1 + max(float(z_on_v0.abs().max()), float(z_own.abs().max())) / 2.0
    target = rec.peer_target(1, 0, 2.0)
    assert not target.requires_grad
    if mode == "own":
        assert close32(target, p1_own, mag)
    elif mode == "rerun":
        assert set(rec.extra) == {"on0", "on1"} and rec.extra["on0"][0] is None
        assert close32(target, p1_on_v0, mag)
    else:
        unmixed = rec.extra["unmixed"][1]
        assert unmixed is not None and not unmixed.logits.requires_grad
        mix = rec.views[0].mix
        p = F.softmax(unmixed.logits / 2.0, 1)
        expected = mix.weights[0, :, None] * p[mix.perms[0]] + mix.weights[1, :, None] * p[mix.perms[1]]
        assert close32(target, expected, 1.0)  # a mix of probabilities: magnitude 1


def test_extra_inputs_run_with_or_without_gradient():
    class Extras(_Probe):
        def make_views(self, batch, ctx):
            v = View(ctx.augment(batch.images), batch.labels, batch.index)
            w = View(ctx.augment(batch.images), batch.labels, batch.index)
            return Views([v, v], {"g": Extra([w, None], grad=True), "n": Extra([w, w])})

    METHODS._items["_extras"] = Extras
    try:
        tr = trainer("method=_extras", "peers=2")
        rec = tr.step_record(next(iter(tr.train_loader)))
    finally:
        del METHODS._items["_extras"]
    assert rec.extra["g"][0].logits.requires_grad and rec.extra["g"][1] is None
    assert not any(o.logits.requires_grad for o in rec.extra["n"])


def _labels(n_per_class: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])


@pytest.mark.parametrize("classes, per, batch", [(16, 8, 16), (4, 40, 32)])
def test_m_per_class_batches_cover_the_epoch_once(classes, per, batch):
    labels = _labels([per] * classes)
    s = MPerClassSampler(2)
    order = s.epoch(labels, batch, 1, seed=3, epoch=0)
    assert order.shape == (len(labels) // batch, batch)
    assert sorted(order.flatten().tolist()) == list(range(len(labels)))  # every sample exactly once
    for row in order.numpy():
        counts = np.bincount(labels[row])
        counts = counts[counts > 0]
        if batch // 2 <= classes:  # enough classes: exactly m of each class in the batch
            assert set(counts.tolist()) == {2}
        assert all(c % 2 == 0 for c in counts)
        assert (labels[row[: batch // 2]] == labels[row[batch // 2:]]).all()  # whole groups, member-major
    assert torch.equal(order, s.epoch(labels, batch, 1, seed=3, epoch=0))  # a function of (seed, epoch)
    assert not torch.equal(order, s.epoch(labels, batch, 1, seed=3, epoch=1))


def test_m_per_class_shards_whole_groups_per_rank():
    labels = _labels([12] * 8)
    data = DeviceSet(ImageSet(np.zeros((len(labels), 2, 2, 1), np.uint8), labels), "cpu")
    ranks = [[b.labels.numpy() for b in DeviceLoader(data, 8, True, 0, r, 2, MPerClassSampler(2))] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(labels) // 16
    for local in ranks[0] + ranks[1]:
        assert (local[:4] == local[4:]).all()  # whole groups: member-major, as the global row
    # the global batch (rank r: columns r::2) is the one-process batch, in the same order
    one = [b.index for b in DeviceLoader(data, 16, True, 0, 0, 1, MPerClassSampler(2))]
    two = [[b.index for b in DeviceLoader(data, 8, True, 0, r, 2, MPerClassSampler(2))] for r in range(2)]
    for k, full in enumerate(one):
        assert torch.equal(full[0::2], two[0][k]) and torch.equal(full[1::2], two[1][k])
    seen = np.concatenate([b.index.numpy() for r in range(2) for b in
                           DeviceLoader(data, 8, True, 0, r, 2, MPerClassSampler(2))])
    assert len(np.unique(seen)) == len(seen) == len(labels)


def test_pair_sampler_gives_anchors_then_same_class_partners():
    labels = _labels([5, 7, 9, 11])
    order = PairSampler().epoch(labels, 8, 1, seed=0, epoch=0)
    assert order.shape == (len(labels) // 8, 16)
    anchors, partners = order[:, :8].flatten(), order[:, 8:].flatten()
    assert len(set(anchors.tolist())) == len(anchors)
    assert (labels[anchors.numpy()] == labels[partners.numpy()]).all()


def test_engine_honours_the_method_sampler():
    tr = trainer("method=_probe", "method.sampler=pairs", "peers=1")
    batch = next(iter(tr.train_loader))
    assert batch.images.shape[0] == 32  # 16 anchors + 16 partners
    assert torch.equal(batch.labels[:16], batch.labels[16:])


def test_before_training_runs_once_and_is_not_repeated_on_resume(tmp_path):
    out = tmp_path / "r"
    cfg = load(None, [*BASE, "method=_probe", "method.pretrain_steps=2", "peers=1", "epochs=2"])
    tr = Trainer(cfg, out)
    snapshot = [p.clone() for p in tr.ema.module.parameters()]
    tr.before_training()
    assert int(tr.method.pretrained) == 1 and tr.prepared
    assert any(not torch.equal(a, b) for a, b in zip(snapshot, tr.ema.module.parameters()))
    tr.before_training()
    assert int(tr.method.pretrained) == 1
    full = train(load(None, [*BASE, "method=_probe", "method.pretrain_steps=2", "peers=1", "epochs=2"]),
                 tmp_path / "full", echo=False)
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["prepared"] and int(ckpt["method"]["pretrained"]) == 1
    resumed = Trainer(cfg, tmp_path / "full")
    resumed.load(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed.before_training()
    assert int(resumed.method.pretrained) == 1
    assert full["final"]["test"]


def test_method_param_groups_set_weight_decay_or_leave_the_optimizer():
    tr = trainer("method=_probe", "method.fusion_wd=1e-5", "peers=1")
    groups = tr.optimizer.param_groups
    fusion = {id(p) for p in tr.method.fusion.parameters()}
    own = [g for g in groups if {id(p) for p in g["params"]} == fusion]
    assert len(own) == 1 and own[0]["weight_decay"] == 1e-5
    assert all(g["weight_decay"] == 5e-4 for g in groups if g is not own[0])

    class Outside(_Probe):
        def param_groups(self):
            return [ParamGroup(list(self.fusion.parameters()), optimized=False)]

    METHODS._items["_outside"] = Outside
    try:
        tr = trainer("method=_outside", "peers=1")
    finally:
        del METHODS._items["_outside"]
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not in_optim & {id(p) for p in tr.method.fusion.parameters()}


def test_addon_terms_join_any_method_and_its_state_is_checkpointed(tmp_path):
    tr = trainer("method=dml", "peers=2", "addon=_double_ce", "addon.weight=0.5")
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert {"ce0", "kl0", "again0", "again1"} <= set(terms)
    assert float(terms["again0"]) == pytest.approx(0.5 * float(terms["ce0"]), rel=0.2)  # same batch, after a step
    assert "addons" in tr.state()


def test_gradient_accumulation_steps_every_k_batches_and_clipping_bounds_the_norm():
    tr = trainer("method=_probe", "peers=1", "optim.accum_steps=2", "optim.grad_clip=0.01")
    calls = []
    real = tr.optimizer.step

    def counted(*a, **k):
        norm = torch.norm(torch.stack([p.grad.norm() for p in tr.trained if p.grad is not None]))
        calls.append(float(norm))
        return real(*a, **k)

    tr.optimizer.step = counted
    for batch in tr.train_loader:  # 4 batches of 16
        tr.train_step(batch)
    assert len(calls) == 2
    assert all(n <= 0.01 + 1e-6 for n in calls)


def test_trunk_grad_scale_divides_only_the_shared_trunk_gradient():
    grads = []
    for scale in (1.0, 0.25):
        tr = trainer("method=_probe", "method.topology=branched", "peers=2")
        tr.module.eval()
        tr.cohort.trunk_grad_scale = scale
        rec = tr.step_record(next(iter(tr.train_loader)))
        sum(o.logits.float().pow(2).mean() for o in rec.outputs).backward()
        grads.append((tr.cohort.nets[0].stem[0].weight.grad.clone(), tr.cohort.nets[1].classifier.weight.grad.clone()))
    (stem1, head1), (stem2, head2) = grads
    assert torch.equal(stem2, 0.25 * stem1)  # a power of 2 scales exactly: bit for bit on any CPU
    assert torch.equal(head2, head1)
