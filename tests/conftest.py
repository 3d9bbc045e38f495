"""Shared fixtures: tiny synthetic configs that train in well under a second per epoch."""
from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from peerdistill.config import Config, load

FMNIST = Path("/usr/share/datasets/fashion-mnist")

TINY = ["data.name=synthetic", "data.size=96", "data.image_size=16", "data.channels=3", "data.num_classes=4",
        "model=resnet8", "batch_size=16", "epochs=2", "progress=false", "tensorboard=false",
        "data.eval_batch_size=64", "device=cpu"]
HAS_CUDA = torch.cuda.is_available()  # read before any test hides the GPUs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a GPU: skipped on machines without one (CI)."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test not marked ``cuda`` runs on the CPU even on a GPU machine, where ``device=auto`` would pick
    the GPU (and torchrun tests NCCL and ``cuda:<rank>``), and the tolerances are the CPU's: CUDA is
    hidden from this process and from the processes a test starts."""
    if request.node.get_closest_marker("cuda"):
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def tiny_cfg(*overrides: str) -> Config:
    """A config small enough for unit tests (4 classes, 16x16, ResNet-8)."""
    return load(None, [*TINY, *overrides])


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One thread for tests of small tensors: a second only adds OpenMP contention on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def have_fmnist() -> bool:
    return (FMNIST / "t10k-labels-idx1-ubyte.gz").exists()


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads(what: str = "a training step") -> Iterator[None]:
    """Inside the block every Python-level tensor-to-host read raises (on a GPU each one is a device
    synchronisation, DESIGN §7), except ``host_values``, which reads CPU-generator draws only."""
    from peerdistill.data.host import host_values

    originals = {attr: getattr(torch.Tensor, attr) for attr in HOST_READS}

    def guarded(attr: str):
        original = originals[attr]

        def read(*args, **kwargs):
            if sys._getframe(1).f_code is not host_values.__code__:
                raise AssertionError(f"{what} called Tensor.{attr}")
            return original(*args, **kwargs)
        return read

    try:
        for attr in HOST_READS:
            setattr(torch.Tensor, attr, guarded(attr))
        yield
    finally:
        for attr, original in originals.items():
            setattr(torch.Tensor, attr, original)


def killed_and_resumed(cfg: Callable[[], Config], out: Path, monkeypatch, after: int = 1) -> dict:
    """Train ``cfg()`` into ``out``, killed (KeyboardInterrupt) once epoch ``after`` is checkpointed, then
    ``--resume`` it to the end; returns the resumed run's summary."""
    from peerdistill.run import train
    from peerdistill.report.logger import RunLogger

    real = RunLogger.epoch

    def killed(self, record):
        real(self, record)
        if record["epoch"] == after:
            raise KeyboardInterrupt  # the process dies after that epoch was checkpointed

    monkeypatch.setattr(RunLogger, "epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), out, echo=False)
    monkeypatch.setattr(RunLogger, "epoch", real)
    return train(cfg(), resume=out, echo=False)


def one_line_error(capsys, *args: str) -> str:
    """Run the CLI with ``args``: it must exit with status 2 and one ``error: ...`` line; returns the line."""
    from peerdistill.cli import main

    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its hash: what a refused command must leave exactly as it was."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}
