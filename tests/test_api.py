"""The own-loop API (peerdistill.api), any nn.Module as a peer, plugins and the user's own Dataset."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from peerdistill.api import Distiller, adapt, from_torch, losses
from peerdistill.config import load
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.data import DATASETS
from peerdistill.data.mix import MIXERS
from peerdistill.methods import ADDONS, METHODS
from peerdistill.methods.functional import kd_soft
from peerdistill.models import MODELS
from tests.conftest import tiny_cfg

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REGISTRIES = (MODELS, METHODS, ADDONS, MIXERS, DATASETS)


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugins loaded by a test register into copies: other tests see the registries as they were."""
    for reg in REGISTRIES:
        monkeypatch.setattr(reg, "_items", dict(reg._items))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))


class TinyCNN(nn.Module):
    """As examples/plugin_models.py's model (timm's forward_features / forward_head), not registered."""

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        emb = fmap.mean((2, 3))
        return emb if pre_logits else self.head(emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Hooked(nn.Module):
    """A model with neither forward_features nor forward_head: tapped by hooks."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


@pytest.mark.numerical
def test_own_loop_dml_equals_engine(one_thread: None) -> None:
    """Same batches, same views, same initial weights: the Distiller's DML terms and parameters after N steps
    are the engine's."""
    cfg = tiny_cfg("method=dml", "method.temperature=2", "precision=fp32", "channels_last=false",
                   "optim.schedule=constant", "epochs=1")
    trainer = Trainer(cfg)
    d = Distiller(copy.deepcopy(list(trainer.cohort.nets)), "dml", input_shape=(3, 16, 16), temperature=2.0)
    o = cfg.optim
    opt = torch.optim.SGD(d.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                          weight_decay=o.weight_decay)
    trainer.module.train()
    trainer.gen.manual_seed(5)
    steps = 0
    for batch in trainer.train_loader:
        g = torch.Generator().set_state(trainer.gen.get_state())  # the engine's view draw, replayed
        x = trainer.augment(batch.images, g)
        engine = trainer.train_step(batch)
        own = d.losses(x, batch.labels)
        opt.zero_grad()
        own["total"].backward()
        opt.step()
        d.after_step()
        assert set(own) == set(engine) | {"total"}
        for k, v in engine.items():
            torch.testing.assert_close(own[k].detach(), v, rtol=1e-5, atol=1e-6)
        steps += 1
    assert steps >= 4
    for (name, p), q in zip(trainer.cohort.named_parameters(), d.cohort.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_every_method_runs_or_refuses_in_one_line() -> None:
    torch.manual_seed(0)
    x, y, idx = torch.randn(8, 1, 8, 8), torch.arange(8) % 4, torch.arange(8)
    ran = []
    for name in METHODS:
        try:
            needs = METHODS.build(name).needs
        except PeerdistillError as e:  # KD: a teacher is required
            assert "\n" not in str(e)
            continue
        n = needs.peers or max(needs.default_peers, needs.min_peers)
        try:
            d = Distiller([TinyCNN(4, 1, 4) for _ in range(n)], name, input_shape=(1, 8, 8), train_labels=y)
        except PeerdistillError as e:
            assert "\n" not in str(e) and str(e)
            continue
        if not d.prepared:
            with pytest.raises(PeerdistillError, match="before_training"):
                d.losses(x, y, idx)
            d.before_training([(x, y, idx)])
        terms = d.losses(x, y, idx)
        assert torch.isfinite(terms["total"])
        torch.testing.assert_close(terms["total"], sum(v.float() for k, v in terms.items() if k != "total"))
        terms["total"].backward()
        d.after_step()
        ran.append(name)
    assert {"dml", "mcl", "pcl", "dkel", "kdcl", "cs_kd", "ps_kd", "ffl"} <= set(ran)


def test_distiller_owns_method_parameters_and_ema() -> None:
    d = Distiller([TinyCNN(4, 1, 4), TinyCNN(4, 1, 6)], "mcl", input_shape=(1, 8, 8), feat_dim=8)
    own = {id(p) for p in d.parameters()}
    assert {id(p) for p in d.method.proj.parameters()} <= own  # the projection heads MCL built
    d = Distiller([TinyCNN(4, 1, 4), TinyCNN(4, 1, 4)], "pcl", input_shape=(1, 8, 8), rampup_epochs=0)
    assert not {id(p) for p in d.ema.parameters()} & {id(p) for p in d.parameters()}
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    d.losses(x, y)["total"].backward()
    d.after_step()  # the mean-teacher schedule's first update copies the student
    assert all(torch.equal(a, b) for a, b in zip(d.ema.module.parameters(), d.cohort.parameters()))
    with pytest.raises(PeerdistillError, match="after_step"):
        d.after_step()


def test_distiller_branched_cohort_takes_the_declared_trunk_gradient() -> None:
    """CL-ILR declares the trunk's gradient as the branches' mean: the Distiller's branched cohort is built
    with that scale (as the engine's), so the shared trunk's gradient is exactly 1/m of the summed one."""
    from peerdistill.models import build_model

    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    grads = {}
    for rescale in (True, False):
        torch.manual_seed(0)
        nets = [build_model("resnet8", 4, 3) for _ in range(3)]
        d = Distiller(nets, "cl_ilr", input_shape=(3, 8, 8), rescale=rescale)
        assert d.cohort.trunk_grad_scale == (1 / 3 if rescale else 1.0)
        d.losses(x, y)["total"].backward()
        grads[rescale] = [p.grad.clone() for p in d.cohort.nets[0].stem.parameters()]
    for on, off in zip(grads[True], grads[False]):  # the same sum, scaled before or after the trunk's backward
        assert float((on - off / 3).abs().max()) <= 1e-5 * float(off.abs().max() / 3)


def test_distiller_refusals() -> None:
    with pytest.raises(PeerdistillError, match="exactly 1"):
        Distiller([TinyCNN(4, 1, 4)] * 2, "byot", input_shape=(1, 8, 8))
    with pytest.raises(PeerdistillError, match="at least 2"):
        Distiller([TinyCNN(4, 1, 4)], "dml", input_shape=(1, 8, 8))
    with pytest.raises(PeerdistillError, match="unknown parameter"):
        Distiller([TinyCNN(4, 1, 4)] * 2, "dml", input_shape=(1, 8, 8), temprature=2)
    with pytest.raises(PeerdistillError, match="classes"):
        Distiller([TinyCNN(4, 1, 4), TinyCNN(5, 1, 4)], "dml", input_shape=(1, 8, 8))
    with pytest.raises(PeerdistillError, match="fails on a 3x8x8 input"):
        Distiller([TinyCNN(4, 1, 4)] * 2, "dml", input_shape=(3, 8, 8))


def test_pure_losses_match_the_methods() -> None:
    torch.manual_seed(0)
    za, zb = torch.randn(6, 4), torch.randn(6, 4)
    kl = losses.dml_mutual([za, zb], temperature=2.0)
    torch.testing.assert_close(kl[0], kd_soft(za, torch.softmax(zb / 2, 1), 2.0))
    torch.testing.assert_close(kl[0], losses.kd_kl(za, zb, 2.0))
    terms = losses.mcl_contrast([torch.randn(6, 5), torch.randn(6, 5)], torch.arange(6) % 2)
    assert set(terms) == {"vcl", "icl"} and all(torch.isfinite(v) for v in terms.values())
    head = nn.Linear(5, 3)
    assert torch.isfinite(losses.sd_dropout_term(torch.randn(6, 5), head))


def test_adapter_hooks_and_timm_style() -> None:
    net = adapt(Hooked(), layers=["layer1", "layer2"], classifier="fc")
    net.check(1, (8, 8))
    assert net.stage_names == ("layer1", "layer2") and net.num_features == 8
    maps = net.forward_features(torch.randn(2, 1, 8, 8))
    assert maps["layer1"].shape == (2, 4, 8, 8) and maps["layer2"].shape == (2, 8, 4, 4)
    ema = copy.deepcopy(net)  # the EMA copy's hooks write into the copy
    assert set(ema.forward_features(torch.randn(2, 1, 8, 8))) == {"layer1", "layer2"}
    bad = adapt(Hooked(), layers=["layer1"], classifier="fc")
    with pytest.raises(PeerdistillError, match="reads 8 features"):
        bad.check(1, (8, 8))
    with pytest.raises(PeerdistillError, match="no submodule 'layer9'"):
        adapt(Hooked(), layers=["layer9"])
    with pytest.raises(PeerdistillError, match="name the layers"):
        adapt(Hooked())
    timm = adapt(TinyCNN(4, 1, 4), layers=["features.2"])  # the ReLU after the first conv
    assert timm.stage_names == ("features.2", "features")
    # BYOT reads the tapped stage; a branched method cannot split an adapted model
    d = Distiller([adapt(TinyCNN(4, 1, 4), layers=["features.2"])], "byot", input_shape=(1, 8, 8))
    assert any(k.startswith("ce") and k != "ce0" for k in d.losses(torch.randn(4, 1, 8, 8), torch.arange(4)))
    with pytest.raises(PeerdistillError, match="shared stage"):
        Distiller([TinyCNN(4, 1, 4) for _ in range(3)], "one", input_shape=(1, 8, 8))


class Intermediates(nn.Module):
    """timm's newer API: forward_intermediates and forward_head, no forward_features."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 3)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = torch.relu(self.a(x))
        out = torch.relu(self.b(h))
        return out, [h, out]

    def forward_head(self, fmap: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        emb = fmap.mean((2, 3))
        return emb if pre_logits else self.head(emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_intermediates(x)[0])


def test_adapter_forward_intermediates() -> None:
    net = adapt(Intermediates())
    net.check(1, (8, 8))
    assert net.stage_names == ("stage0", "stage1", "features") and net.num_classes == 3
    d = Distiller([Intermediates()], "byot", input_shape=(1, 8, 8))
    assert "ce0" in d.losses(torch.randn(4, 1, 8, 8), torch.arange(4) % 3)


def test_plugins_in_config_and_engine(tmp_path: Path, registries: None) -> None:
    plugin = EXAMPLES / "plugin_models.py"
    cfg = load(None, [f"plugins=[{plugin}]", "model=tinycnn", "model.width=4", *TINY_DATA])
    assert cfg.plugins == [str(plugin)]
    with pytest.raises(PeerdistillError, match="cannot be imported"):
        load(None, ["plugins=[no_such_module_xyz]"])
    with pytest.raises(PeerdistillError, match="does not exist"):
        load(None, [f"plugins=[{tmp_path / 'missing.py'}]"])
    cfg = load(None, [f"plugins=[{plugin}]", "model=tinycnn", "method=pcl", *TINY_DATA])
    with pytest.raises(PeerdistillError, match="adapted nn.Module"):
        Trainer(cfg)


TINY_DATA = ["data.name=synthetic", "data.size=64", "data.image_size=8", "data.num_classes=4", "data.channels=1",
             "batch_size=16", "epochs=1", "progress=false", "tensorboard=false", "device=cpu"]


def test_from_torch_sources() -> None:
    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.full((1, 4, 4), i / 10), i % 3

    s = from_torch(DS(), torch.utils.data.DataLoader(DS(), batch_size=4))
    assert s.train.images.shape == (10, 4, 4, 1) and s.num_classes == 3 and s.test.images[3, 0, 0, 0] == 76
    with pytest.raises(PeerdistillError, match=r"\[0, 1\]"):
        from_torch([(torch.full((1, 2, 2), 2.0), 0)], [(torch.zeros(1, 2, 2), 0)])
    with pytest.raises(PeerdistillError, match="differ in shape"):
        from_torch([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 3), 0)], [(torch.zeros(1, 2, 2), 0)])


@pytest.mark.parametrize("script", ["own_loop.py", "own_dataset.py", "cli_plugin.py"])
def test_examples_run(script: str, tmp_path: Path) -> None:
    lines = (EXAMPLES / script).read_text().splitlines()
    assert len(lines) <= 50
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_entry_point_plugins(tmp_path: Path) -> None:
    """An installed package's entry point (group peerdistill.plugins) is imported by every command."""
    (tmp_path / "fakeplug.py").write_text(
        "from peerdistill.methods import METHODS\nfrom peerdistill.methods.dml import DML\n\n"
        "@METHODS.register('dml_fake')\nclass DMLFake(DML):\n    '''DML under another name (a test plugin).'''\n")
    info = tmp_path / "fakeplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peerdistill.plugins]\nfake = fakeplug\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1] / 'src'}"}
    done = subprocess.run([sys.executable, "-m", "peerdistill", "list", "methods"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dml_fake" in done.stdout


def test_distiller_mixer_and_per_peer_views() -> None:
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    d = Distiller([TinyCNN(4, 1, 4), TinyCNN(4, 1, 4)], "dml", input_shape=(1, 8, 8), mixer="cutmix",
                  mixer_args={"prob": 1.0})
    views = d.views(x, y)
    assert views.peers[0].mix is not None and not torch.equal(views.peers[0].x, x)
    assert torch.isfinite(d.losses(x, y)["total"])
    d = Distiller([TinyCNN(4, 1, 4), TinyCNN(4, 1, 4)], "kdcl", input_shape=(1, 8, 8), augment=lambda t: t.flip(3))
    views = d.views(x, y)  # per-peer views: one augment call each
    assert views.peers[0] is not views.peers[1] and torch.equal(views.peers[1].x, x.flip(3))
    mine = [x, x + 1]
    views = d.views(mine, y)  # or the user's own per-peer views
    assert views.peers[1].x is mine[1]
