"""What the engine decides for a GPU, proven on a CPU machine by simulating the CUDA answers (device
capabilities, generator states) or the state of another rank: precision, memory format, determinism,
resume across precisions and devices, DDP settings, the process group's timeout and rank 0's last phase."""
from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest
import torch

from peerdistill.engine import distributed as dist
from peerdistill import run as run_mod
from peerdistill.engine import trainer as trainer_mod
from peerdistill.engine.checkpoint import save_atomic
from peerdistill.engine.precision import Precision, resolve_precision
from peerdistill.engine.trainer import Trainer

from .conftest import TINY, tiny_cfg
from .reference import first_batch

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def _index(device) -> int:
    return device if isinstance(device, int) else (torch.device(device).index or 0)


@pytest.fixture
def gpus(monkeypatch):
    """Two simulated GPUs: cuda:0 (the current device) is pre-Ampere (a V100, capability 7.0), cuda:1 an
    A100 (8.0). bf16 works on both, on cuda:0 only by emulation."""
    majors = {0: 7, 1: 8}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=majors[_index(device or 0)], minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    return majors


# ------------------------------------------------------------------------------------- 1. precision=auto
def test_auto_precision_is_native_bf16_of_the_training_device_else_fp16(gpus):
    """Emulated bf16 is not bf16: the V100 trains in fp16 with a scaler, and the question is asked of the
    training device, not of the current one."""
    v100, a100 = resolve_precision("auto", CUDA0), resolve_precision("auto", CUDA1)
    assert (v100.name, v100.use_scaler) == ("fp16", True)
    assert (a100.name, a100.use_scaler) == ("bf16", False)
    assert resolve_precision("bf16", CUDA0).name == "bf16"  # asked for explicitly, it is granted


# ------------------------------------------------------------------------- 2. resume across precisions
def _fp16_on_this_cpu(monkeypatch):
    """The run's precision as ``auto`` resolves on a pre-Ampere GPU: fp16 with a gradient scaler (the CPU's
    fp16 autocast stands in for the GPU's)."""
    monkeypatch.setattr(trainer_mod, "resolve_precision", lambda name, device: Precision(torch.float16, "cpu", True))


def test_a_checkpoint_without_a_scaler_loads_into_an_fp16_run_and_back(tmp_path, monkeypatch):
    """A run saved where no scaler runs (CPU, bf16) is resumed, evaluated or robustness-evaluated where
    ``auto`` gives fp16: the scaler starts afresh instead of 'the source state dict is empty'."""
    cpu = Trainer(tiny_cfg("precision=fp32"), None)
    save_atomic(cpu.state(), tmp_path / "fp32.pt")
    with monkeypatch.context() as m:
        _fp16_on_this_cpu(m)
        gpu = Trainer(tiny_cfg("precision=fp32"), None)
    assert gpu.scaler.is_enabled()
    gpu.load(tmp_path / "fp32.pt")
    assert gpu.scaler.get_scale() == 65536.0
    assert gpu.resumed_precision == "fp32"  # recorded in the checkpoint
    gpu.train_step(first_batch(gpu))  # trains on
    gpu.scaler.update(1024.0)
    save_atomic(gpu.state(), tmp_path / "fp16.pt")
    cpu.load(tmp_path / "fp16.pt")  # and an fp16 checkpoint loads where no scaler runs
    assert cpu.resumed_precision == "fp16" and not cpu.scaler.is_enabled()


def test_resuming_in_another_precision_says_so(tmp_path, monkeypatch, capsys):
    """precision=auto trained in fp16 on one machine, continued where it resolves to bf16 or fp32."""
    from peerdistill.report.logger import RunLogger

    def killed(self, record):
        raise KeyboardInterrupt  # after the first epoch's checkpoint

    with monkeypatch.context() as m:
        _fp16_on_this_cpu(m)
        m.setattr(RunLogger, "epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            run_mod.train(tiny_cfg(), tmp_path / "run", echo=False)
    run_mod.train(tiny_cfg(), resume=tmp_path / "run", echo=True)
    err = capsys.readouterr().err
    assert "trained in fp16" in err and "not bit-exact" in err


# ------------------------------------------------------------------------ 3. DKEL's initialisation in fp16
def test_dkel_teacher_initialisation_under_fp16_is_scaled_and_skips_inf_steps(monkeypatch):
    """Under fp16 the teacher's SGD steps go through a gradient scaler: a step whose gradient overflows
    is skipped instead of writing NaN into the teacher (which is then averaged with decay 0.999)."""
    from peerdistill.methods import dkel

    with monkeypatch.context() as m:
        _fp16_on_this_cpu(m)
        tr = Trainer(tiny_cfg("method=dkel", "method.init=1"), None)
    before = [p.detach().clone() for p in tr.ema.module.parameters()]
    real = dkel.view_ce
    monkeypatch.setattr(dkel, "view_ce", lambda *a: real(*a) * float("inf"))  # an overflowing loss
    tr.before_training()
    after = list(tr.ema.module.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # both steps skipped
    assert int(tr.method.init_steps) == 2

    monkeypatch.setattr(dkel, "view_ce", real)
    tr.prepared = False
    tr.before_training()  # finite losses: the steps are taken
    assert any(not torch.equal(a, b) for a, b in zip(tr.ema.module.parameters(), before))


# ------------------------------------------------------------------------------ 4. CUDA RNG per rank
@pytest.fixture
def cuda_rng(monkeypatch):
    """One visible GPU with a generator state the test can read; setting another index raises, as torch's
    ``set_rng_state`` does for a device that does not exist."""
    states = {0: torch.full((16,), 7, dtype=torch.uint8)}

    def set_state(state, device="cuda"):
        i = _index(device)
        if i not in states:
            raise IndexError(f"list index out of range (cuda:{i})")
        states[i] = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[_index(device)].clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states.values()])
    return states


def _as_gpu_rank(tr: Trainer, rank: int, world: int) -> None:
    """Make ``tr`` behave as rank ``rank`` of ``world`` processes training on ``cuda:0`` of its machine."""
    tr.device = CUDA0
    tr.dist = dist.DistInfo(rank, 0, world, CUDA0)


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes(cuda_rng, tmp_path):
    """An older checkpoint holds rank 0's process's state of every visible GPU; resumed where fewer are
    visible, only the training device's state is restored (torch's set_rng_state_all raised IndexError)."""
    tr = Trainer(tiny_cfg("precision=fp32"), None)
    state = tr.state()
    saved = torch.full((16,), 3, dtype=torch.uint8)
    state["rng"] = {"torch": torch.get_rng_state(), "cuda": [saved, torch.full((16,), 4, dtype=torch.uint8)]}
    save_atomic(state, tmp_path / "old.pt")
    _as_gpu_rank(tr, 0, 1)
    tr.load(tmp_path / "old.pt")
    assert torch.equal(cuda_rng[0], saved)


def test_every_rank_saves_and_restores_its_own_rng_states(cuda_rng, tmp_path):
    """Rank 0 writes the checkpoint with every rank's CPU and device generator state (gathered at the end
    of the epoch); each rank restores its own: rank 1's dropout draws continue as rank 1's."""
    tr = Trainer(tiny_cfg("precision=fp32"), None)
    _as_gpu_rank(tr, 0, 2)
    rank1 = {"cpu": torch.Generator().manual_seed(12345).get_state(), "device": torch.full((16,), 9, dtype=torch.uint8)}
    tr.rank_rng = [{}, rank1]  # what the end-of-epoch gather brought from rank 1
    save_atomic(tr.state(), tmp_path / "ckpt.pt")
    per_rank = torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]["per_rank"]
    assert torch.equal(per_rank[0]["device"], torch.full((16,), 7, dtype=torch.uint8))  # rank 0's own, read at save
    assert torch.equal(per_rank[1]["device"], rank1["device"])

    other = Trainer(tiny_cfg("precision=fp32"), None)
    _as_gpu_rank(other, 1, 2)
    other.load(tmp_path / "ckpt.pt")
    assert torch.equal(torch.get_rng_state(), rank1["cpu"]) and torch.equal(cuda_rng[0], rank1["device"])


def test_rng_gather_happens_on_every_rank_before_rank_0_checkpoints(monkeypatch):
    tr = Trainer(tiny_cfg("epochs=1", "precision=fp32"), None)
    calls = []
    tr.dist = dist.DistInfo(0, 0, 2, torch.device("cpu"))
    monkeypatch.setattr(tr.dist.__class__, "gather", lambda self, obj: calls.append("gather") or [obj, obj])
    monkeypatch.setattr(tr.dist.__class__, "mean", lambda self, values: values)
    monkeypatch.setattr(tr.dist.__class__, "barrier", lambda self: calls.append("barrier"))
    monkeypatch.setattr(tr.dist.__class__, "broadcast", lambda self, module: None)
    monkeypatch.setattr(tr, "_end_epoch", lambda train: calls.append("end_epoch") or {})
    tr.fit()
    assert calls == ["gather", "end_epoch", "barrier"]
    assert len(tr.rank_rng) == 2


# ---------------------------------------------------------------------------- 5. process-group timeout
def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    seen = {}

    class Started(Exception):
        pass

    def init(backend, **kwargs):
        seen.update(backend=backend, **kwargs)
        raise Started

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.tdist, "init_process_group", init)
    with pytest.raises(Started):
        Trainer(tiny_cfg("dist_timeout=5400"), None)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=5400)}


def test_robustness_evaluation_runs_after_the_last_barrier(tmp_path, monkeypatch):
    """Under torchrun the other ranks leave once the summary is written; rank 0 evaluates robustness alone
    afterwards (it used to run while they waited in a barrier that a long evaluation timed out)."""
    events = []
    monkeypatch.setattr(dist.DistInfo, "barrier", lambda self: events.append("barrier"))
    monkeypatch.setattr(run_mod, "pending_robustness", lambda out, cfg, trainer=None: events.append("robustness"))
    run_mod.train(tiny_cfg("epochs=1", "robustness={adversarial: true, limit: 8}"), tmp_path / "run", echo=False)
    assert events[-2:] == ["barrier", "robustness"]


# ------------------------------------------------------------------- 7. cuDNN, determinism, memory format
@pytest.fixture
def backends():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def test_cudnn_autotunes_unless_deterministic(backends, monkeypatch):
    from peerdistill.engine.precision import configure_backends

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_backends(CUDA0, deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    configure_backends(CUDA0, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled()
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS refuses deterministic GEMMs without it
    configure_backends(torch.device("cpu"), deterministic=False)
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_config_reaches_torch_and_resume_is_exact(backends, tmp_path, monkeypatch):
    from .conftest import killed_and_resumed

    def cfg():
        return tiny_cfg("deterministic=true", "epochs=2")

    Trainer(cfg(), None)
    assert torch.are_deterministic_algorithms_enabled()
    straight = run_mod.train(cfg(), tmp_path / "straight", echo=False)
    resumed = killed_and_resumed(cfg, tmp_path / "cut", monkeypatch)
    assert resumed["final"] == straight["final"]


def test_channels_last_by_device_and_precision(gpus):
    from peerdistill.engine.precision import resolve_channels_last

    fp32, bf16 = resolve_precision("fp32", CUDA1), resolve_precision("bf16", CUDA1)
    assert resolve_channels_last(None, CUDA1, fp32) is False  # cuDNN's fp32 kernels are NCHW-native
    assert resolve_channels_last(None, CUDA1, bf16) is True  # tensor-core kernels are NHWC
    assert resolve_channels_last(None, CUDA0, resolve_precision("auto", CUDA0)) is True  # fp16
    cpu = torch.device("cpu")
    assert resolve_channels_last(None, cpu, resolve_precision("fp32", cpu)) is True  # unchanged on the CPU
    assert resolve_channels_last(False, CUDA1, bf16) is False  # an explicit setting wins


# ------------------------------------------------------------------------------------ 8. the test suite
def test_the_suite_is_pinned_to_the_cpu():
    """On a GPU machine the suite must still run on the CPU (its tolerances are the CPU's; torchrun tests
    would use NCCL and cuda:<rank>): the configs say so and CUDA is hidden from tests not marked cuda."""
    import os

    from peerdistill.engine.precision import resolve_device

    from . import test_distributed

    assert tiny_cfg().device == "cpu" and "device=cpu" in TINY and "device=cpu" in test_distributed.BASE
    assert not torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert resolve_device("auto") == torch.device("cpu")


def test_the_cuda_marker_is_registered(pytestconfig):
    assert any(m.startswith("cuda:") for m in pytestconfig.getini("markers"))


# --------------------------------------------------------------------- 9. one trainer at the end of a run
def test_the_final_robustness_evaluation_reuses_the_runs_trainer(tmp_path, monkeypatch):
    """No second Trainer (a second copy of the device-resident data and networks) is built for the
    robustness evaluation at the end of training."""
    built = []
    real = Trainer.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", counting)
    run_mod.train(tiny_cfg("epochs=1", "robustness={adversarial: true, eps: [0.01], attacks: [fgsm], limit: 8}"),
                  tmp_path / "run", echo=False)
    assert len(built) == 1
    assert (tmp_path / "run" / "eval.json").is_file() and not (tmp_path / "run" / run_mod.ROBUST_PENDING).exists()


# ------------------------------------------------------------------------- 10. find_unused_parameters
@pytest.mark.parametrize("overrides,unused", [(("method=dml",), False), (("method=okddip",), False),
                                              (("method=okddip", "method.detach_targets=true"), True)])
def test_ddp_searches_for_unused_parameters_only_when_the_method_declares_them(overrides, unused, monkeypatch):
    """Whether each declaration is true is checked for every method and option in test_device_harness."""
    seen = {}

    class DDP:  # records how the step module would be wrapped
        def __new__(cls, module, **kwargs):
            seen.update(kwargs)
            return module

        @staticmethod
        def _set_params_and_buffers_to_ignore_for_model(module, names):
            pass

    monkeypatch.setattr(dist.nn.parallel, "DistributedDataParallel", DDP)
    monkeypatch.setattr(dist, "setup", lambda device, timeout: dist.DistInfo(0, 0, 2, torch.device("cpu")))
    Trainer(tiny_cfg(*overrides), None)
    assert seen["find_unused_parameters"] is unused
