"""Device-correctness on a CPU-only machine: every registered method, mixer and add-on (and the variants
their options select) trains and evaluates on the ``meta`` device with zero findings of
:mod:`tests.device_harness`; the harness itself catches each class of device bug it claims to."""
from __future__ import annotations

import typing

import pytest
import torch

from peerdistill.config import load
from peerdistill.data.mix import MIXERS
from peerdistill.run import train
from peerdistill.methods import ADDONS, METHODS
from peerdistill.methods.contrastive import bank_contrast, mutual_contrast
from peerdistill.metrics.classification import HeadMetrics, expected_calibration_error, reliability_bins

from .device_harness import DEVICE, Finding, on_meta, run_engine

# On meta, BatchNorm and other ops run through Python decompositions (~10 ms a call): a small test split in
# one evaluation batch keeps each configuration near a second.
BASE = ["data.name=synthetic", "data.size=80", "data.test_size=24", "data.val_split=0", "data.image_size=16",
        "data.num_classes=5", "model=resnet8", "batch_size=16", "epochs=1", "progress=false", "tensorboard=false",
        "data.eval_batch_size=32", "device=cpu"]
TEACHER = "<teacher>"  # replaced by the teacher run's directory


def _peers(name: str) -> list[str]:
    needs = METHODS.build(name, **({"teacher": "x"} if "teacher" in METHODS.params(name) else {})).needs
    peers = needs.peers or max(needs.default_peers, needs.min_peers)
    return [] if needs.peers else [f"peers={peers}"]


def _method(name: str, *extra: str) -> list[str]:
    teacher = [f"method.teacher={TEACHER}"] if "teacher" in METHODS.params(name) else []
    return [f"method={name}", *_peers(name), *teacher, *extra]


def _option_variants(name: str) -> list[tuple[str, ...]]:
    """One configuration per alternative value of each bool / Literal option of a method."""
    out = []
    defaults = METHODS.params(name)
    for key, hint in METHODS.hints(name).items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if base is bool:
            out.append((f"method.{key}={str(not defaults[key]).lower()}",))
        elif typing.get_origin(base) is typing.Literal:
            out += [(f"method.{key}={v}",) for v in typing.get_args(base) if v != defaults[key]]
    return out


def configurations() -> list[typing.Any]:
    """Every method with its defaults and each option variant it accepts (a method's own validation may
    refuse a combination: that one is skipped), every mixer, every add-on, and the engine's other paths."""
    cases = [pytest.param(_method(m), id=m) for m in METHODS]
    cases += [pytest.param(_method(m, *v), id=f"{m}-{'-'.join(v)}") for m in METHODS for v in _option_variants(m)]
    for mixer in MIXERS:  # with KD, which gives CutMixPick its teacher to score with
        cases.append(pytest.param(_method("kd", f"mixer={mixer}", *(["mixer.prob=1"] if "prob" in MIXERS.params(mixer)
                                                                    else [])), id=f"mixer-{mixer}"))
    cases += [pytest.param(_method("dml", f"addon={a}"), id=f"addon-{a}") for a in ADDONS]
    special = {
        "dml-fused": ["fused=true"],
        "dml-per-view-rerun": ["mixer=cutmix", "mixer.prob=1", "method.mix=per_view", "method.kd_target=rerun"],
        "dml-per-view-components": ["mixer=cutmix", "mixer.prob=1", "method.mix=per_view",
                                    "method.kd_target=components"],
        "dml-cutout-accum-clip-adamw": ["data.cutout=4", "optim.accum_steps=2", "optim.grad_clip=1",
                                        "optim.name=adamw"],
        "mcl-bank": ["method.contrast=bank", "method.neg_k=8"],
        "kd-cutmixpick-kld": ["mixer=cutmixpick", "mixer.criterion=kld"],
        "msa-cutnmix-per-view": ["mixer=cutnmix", "mixer.prob=1", "method.mix=per_view"],
    }
    for case, extra in special.items():
        cases.append(pytest.param(_method(case.split("-")[0], *extra), id=case))
    return cases


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness") / "teacher"
    train(load(None, [*BASE, "method=independent", "peers=1"]), out_dir=out, echo=False)
    return out


def _config(overrides: list[str], teacher_dir):
    from peerdistill.errors import PeerdistillError

    try:
        return load(None, [*BASE, *(o.replace(TEACHER, str(teacher_dir)) for o in overrides)])
    except PeerdistillError as e:  # pragma: no cover - a variant the config itself refuses
        pytest.skip(str(e))


@pytest.mark.parametrize("overrides", configurations())
def test_engine_on_the_device(overrides, teacher_dir):
    """Before-training work, two training steps (from the epoch's second batch: the steady state) and the
    evaluation of every head, on meta: no CPU tensor meets a device tensor, no CPU generator drives a
    device op, no host read inside a step, no op that deterministic=true would refuse on CUDA.

    And the method's ``unused_params`` declaration is true: DDP is told to search for parameters without a
    gradient exactly when a step leaves some (a wrong ``False`` stops a multi-process run; a wrong ``True``
    costs a graph traversal per step)."""
    from peerdistill.engine.build import validate_config
    from peerdistill.errors import PeerdistillError

    cfg = _config(overrides, teacher_dir)
    try:
        validate_config(cfg)
    except PeerdistillError as e:
        pytest.skip(f"refused by the method: {e}")
    run = run_engine(cfg, steps=2, start=1)
    assert not run.findings, "\n".join(map(str, run.findings))
    assert run.unused_declared == bool(run.no_grad), f"unused_params={run.unused_declared}; no gradient: {run.no_grad}"


def test_lmcl_meta_step_on_the_device(teacher_dir):
    """L-MCL's meta step (torch.func through two virtual SGD steps) runs on the epoch's first batch."""
    run = run_engine(_config(_method("lmcl", "method.times=1"), teacher_dir), steps=1, start=0)
    assert not run.findings, "\n".join(map(str, run.findings))


def test_robustness_evaluation_on_the_device(tmp_path):
    """``peerdistill eval --robustness`` (FGSM, PGD with its CPU-seeded random start, corruptions, OOD
    scores with ODIN's input gradient) through a run's trainer on meta."""
    from peerdistill.evaluation.robust import RobustOptions, robust_evaluate
    from peerdistill.engine.trainer import Trainer

    out = tmp_path / "run"
    cfg = load(None, [*BASE, "method=dml", "peers=2"])
    train(cfg, out_dir=out, echo=False)
    cfg.device, cfg.precision = DEVICE, "fp32"
    opts = RobustOptions(adversarial=True, corruptions=True, ood=True, eps=[2 / 255], pgd_steps=2, adv_limit=8,
                         families=["gaussian_noise", "contrast"], severities=[1], corruption_limit=8,
                         ood_data=["gaussian"], ood_limit=8, batch_size=8, plots=False, fgsm_authors=True)
    with on_meta() as check:
        trainer = Trainer(cfg, None)
        with check.reading():  # its results are read back by design; device problems still count
            robust_evaluate(out, opts, trainer=trainer)
    assert not check.findings, "\n".join(map(str, check.findings))


# ------------------------------------------------------------------------ item 6: the two CUDA host copies
def _findings(fn) -> list[Finding]:
    """The findings of ``fn()`` on meta (results read back allowed); an error with no finding is raised."""
    with on_meta() as check, check.reading():
        try:
            fn()
        except Exception:
            if not check.findings:
                raise
    return check.findings


def test_mcl_contrast_indexes_with_device_indices():
    """MCL's in-batch (``vcl_once``) and bank contrast take the diagonal with indices made on the device:
    with host ``arange`` indices each step copied them and synchronised the stream on CUDA."""
    v = torch.randn(2, 6, 8, device=DEVICE)
    labels = torch.zeros(6, dtype=torch.long, device=DEVICE)
    pairs = torch.tensor([[0, 1]], device=DEVICE)
    banks, idx = torch.randn(2, 20, 8, device=DEVICE), torch.zeros(6, 5, dtype=torch.long, device=DEVICE)
    findings = _findings(lambda: (mutual_contrast(v, pairs, labels, 0.1, 3.0, vcl_once=True),
                                  bank_contrast(v, banks, idx, 0.1, 3.0)))
    assert not findings, "\n".join(map(str, findings))


def test_calibration_metrics_take_device_tensors():
    """ECE and reliability bins of device tensors (what studies/calibration.py passes): bin edges on the
    device and a deterministic sum (a weighted bincount raises on CUDA under deterministic=true)."""
    conf = torch.rand(50, device=DEVICE)
    correct = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    metrics = HeadMetrics()

    def evaluate() -> None:
        expected_calibration_error(conf, correct)
        reliability_bins(conf, correct)
        metrics.update(torch.randn(50, 5, device=DEVICE), torch.zeros(50, dtype=torch.long, device=DEVICE))
        metrics.compute()

    findings = _findings(evaluate)
    assert not findings, "\n".join(map(str, findings))
    c = torch.tensor([0.05, 0.5, 0.95, 1.0])
    ok = torch.tensor([False, True, True, True])
    assert expected_calibration_error(c, ok, bins=10) == pytest.approx((0.05 + 0.5 + 0.05 + 0.0) / 4)


# ------------------------------------------------------------------ the harness catches each class of bug
def _kinds(fn) -> set[str]:
    with on_meta() as check:
        try:
            fn()
        except (RuntimeError, NotImplementedError, TypeError):
            pass  # meta's own refusal: recorded as a finding too
    return {f.kind for f in check.findings}


@pytest.fixture
def x():
    return torch.randn(8, 4, device=DEVICE)


def test_harness_flags_a_cpu_index_and_cpu_boundaries(x):
    assert _kinds(lambda: x[torch.arange(8), torch.arange(8) % 4]) == {"cpu-tensor"}
    assert _kinds(lambda: torch.bucketize(x, torch.linspace(0, 1, 5))) == {"cpu-tensor"}
    assert _kinds(lambda: x.gather(1, torch.zeros(8, 1, dtype=torch.long))) == {"cpu-tensor"}
    assert _kinds(lambda: x[torch.arange(8, device=DEVICE)] * torch.tensor(2.0)) == set()  # 0-dim: a scalar


def test_harness_flags_a_cpu_tensor_in_device_maths(x):
    assert _kinds(lambda: x + torch.ones(4)) == {"cpu-tensor", "rejected"}
    assert _kinds(lambda: torch.cat([x, torch.ones(1, 4)])) == {"cpu-tensor", "rejected"}


def test_harness_flags_a_cpu_generator_driving_a_device_op(x):
    gen = torch.Generator().manual_seed(0)
    assert _kinds(lambda: torch.rand(8, generator=gen, device=DEVICE)) == {"generator"}
    assert _kinds(lambda: x.uniform_(generator=gen)) == {"generator"}
    assert _kinds(lambda: torch.rand(8, generator=gen).to(DEVICE)) == set()  # drawn on the host, then moved


def test_harness_flags_host_reads_and_data_dependent_shapes(x):
    assert _kinds(lambda: x.sum().item()) == {"host-read", "rejected"}
    assert _kinds(lambda: bool(x.sum() > 0)) == {"host-read", "rejected"}
    assert _kinds(lambda: x[x > 0]) >= {"rejected"}
    assert _kinds(lambda: x.nonzero()) == {"host-read", "rejected"}
    assert _kinds(lambda: x.to("cpu")) == {"host-read", "rejected"}
    assert _kinds(lambda: x.to(torch.float64)) == set()


def test_harness_flags_what_deterministic_mode_refuses_on_cuda(x):
    ids = torch.zeros(8, dtype=torch.long, device=DEVICE)
    assert "nondeterministic" in _kinds(lambda: torch.bincount(ids, weights=x[:, 0], minlength=3))
    assert _kinds(lambda: x.cumsum(0)) == {"nondeterministic"}
    y = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    assert _kinds(lambda: torch.nn.functional.adaptive_avg_pool2d(y, 2)) == {"nondeterministic"}
    assert _kinds(lambda: torch.nn.functional.adaptive_avg_pool2d(y, 1)) == set()  # a mean: deterministic
    assert _kinds(lambda: torch.zeros(3, device=DEVICE).index_add_(0, ids[:3], x[:3, 0])) == set()


def test_harness_reports_where_in_the_library_a_finding_is():
    from peerdistill.methods import functional

    f = Finding("cpu-tensor", "op", "x")
    assert str(f) == "cpu-tensor: op at x"
    with on_meta() as check:
        try:
            functional.kd_kl(torch.randn(4, 3, device=DEVICE), torch.randn(4, 3), 2.0)
        except RuntimeError:
            pass
    assert check.findings and all("functional.py" in f.where for f in check.findings)
