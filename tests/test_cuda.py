"""On a real GPU (marked ``cuda``: skipped without one; ``benchmarks/gpu_check.sh`` runs them): what the
meta-device harness and the simulated-CUDA tests cannot show -- the kernels exist and run, no step waits
for the device, deterministic runs and their resumes repeat bit for bit, and the decisions the engine makes
for a GPU match the hardware."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from peerdistill.config import load
from peerdistill.engine.precision import resolve_channels_last, resolve_precision
from peerdistill.run import train
from peerdistill.engine.trainer import Trainer
from peerdistill.methods import METHODS

from .conftest import killed_and_resumed
from .reference import first_batch

pytestmark = pytest.mark.cuda

GPU = ["data.name=synthetic", "data.size=512", "data.test_size=128", "data.image_size=32", "data.num_classes=10",
       "model=resnet8", "batch_size=64", "epochs=2", "progress=false", "tensorboard=false",
       "data.eval_batch_size=128", "device=cuda"]


def gpu_cfg(*overrides: str):
    return load(None, [*GPU, *overrides])


@pytest.fixture(autouse=True)
def _nondeterministic_afterwards():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "teacher"
    train(gpu_cfg("method=independent", "peers=1", "epochs=1"), out, echo=False)
    return out


def _method_cfg(name: str, teacher_dir, *extra: str):
    over = [f"method={name}", *extra]
    if "teacher" in METHODS.params(name):
        over.append(f"method.teacher={teacher_dir}")
    return gpu_cfg(*over)


def test_auto_precision_and_memory_format_match_the_device():
    dev = torch.device("cuda")
    native = torch.cuda.get_device_capability(dev)[0] >= 8
    p = resolve_precision("auto", dev)
    assert p.name == ("bf16" if native else "fp16")
    assert resolve_channels_last(None, dev, resolve_precision("fp32", dev)) is False
    assert resolve_channels_last(None, dev, p) is True


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_steps_on_the_gpu_without_host_synchronisation(name, teacher_dir):
    """Three steps per method under torch's sync debug mode: any operation that makes the host wait for
    the device (a read, a blocking copy from pageable memory) is a warning, and there must be none
    (bf16 or fp32: no GradScaler, whose inf check reads the device)."""
    tr = Trainer(_method_cfg(name, teacher_dir), None)
    if tr.precision.use_scaler:
        pytest.skip("fp16 (no native bf16 here): GradScaler reads its inf check every step by design")
    tr.before_training()
    batches = list(tr.train_loader)
    tr.step = 1  # steady state (L-MCL's meta step on the first batch has its own synchronisations)
    tr.train_step(batches[1])  # lazy initialisation (cuDNN autotuning) outside the count
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches[2:4]:
                terms = tr.train_step(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_under_deterministic_true(name, teacher_dir):
    """No op of any method raises under torch.use_deterministic_algorithms(True) on CUDA (the meta
    harness checks a list of such ops; this is the device's own answer)."""
    tr = Trainer(_method_cfg(name, teacher_dir, "deterministic=true"), None)
    tr.before_training()
    for b in list(tr.train_loader)[:2]:
        tr.train_step(b)
    tr.evaluate(tr.data.test)


@pytest.mark.parametrize("extra", [("method=dml", "addon=sd_dropout"), ("method=mcl", "method.contrast=bank"),
                                   ("method=pcl",)], ids=["dml+sd_dropout", "mcl-bank", "pcl"])
def test_kill_and_resume_is_exact_under_deterministic_true(extra, tmp_path, monkeypatch):
    """Dropout draws (device generator), bank draws (a device generator per step), EMA copies: a run killed
    after its first epoch and resumed ends bit-identical to the uninterrupted run."""
    def cfg():
        return gpu_cfg(*extra, "deterministic=true", "epochs=2")

    straight = train(cfg(), tmp_path / "straight", echo=False)
    resumed = killed_and_resumed(cfg, tmp_path / "cut", monkeypatch)
    assert resumed["final"] == straight["final"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    for k, v in a["cohort"].items():
        assert torch.equal(v, b["cohort"][k]), k


def test_fused_cohort_matches_the_loop_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 rounds each path differently
    loop = Trainer(gpu_cfg("method=dml", "precision=fp32", "deterministic=true"), None)
    fused = Trainer(gpu_cfg("method=dml", "precision=fp32", "deterministic=true", "fused=true"), None)
    fused.cohort.load_state_dict(loop.cohort.state_dict())
    b = first_batch(loop)
    t1, t2 = loop.train_step(b), fused.train_step(b)
    for k in t1:
        assert float(t1[k]) == pytest.approx(float(t2[k]), rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_train(precision):
    tr = Trainer(gpu_cfg("method=dml", f"precision={precision}"), None)
    assert tr.scaler.is_enabled() is (precision == "fp16")
    for b in list(tr.train_loader)[:3]:
        terms = tr.train_step(b)
    assert all(torch.isfinite(v) for v in terms.values())


def test_evaluation_metrics_on_device_tensors_match_the_cpu():
    from peerdistill.metrics.classification import expected_calibration_error, reliability_bins

    g = torch.Generator().manual_seed(0)
    conf, correct = torch.rand(1000, generator=g), torch.rand(1000, generator=g) < 0.7
    assert expected_calibration_error(conf.cuda(), correct.cuda()) == pytest.approx(
        expected_calibration_error(conf, correct), rel=1e-12)
    assert reliability_bins(conf.cuda(), correct.cuda()) == reliability_bins(conf, correct)


def test_robustness_evaluation_and_rng_state_on_the_gpu(tmp_path):
    cfg = gpu_cfg("method=dml", "epochs=1", "robustness={adversarial: true, ood: true, eps: [0.01], limit: 64, "
                  "ood_data: [gaussian]}")
    train(cfg, tmp_path / "run", echo=False)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "adversarial" in ev["latest"] and "ood" in ev["latest"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    (own,) = ckpt["rng"]["per_rank"]
    assert isinstance(own["device"], torch.Tensor)  # this process's own GPU generator
    assert ckpt["precision"] == resolve_precision("auto", torch.device("cuda")).name
