"""A CPU-only proof of device-correctness: the engine's code run on the ``meta`` device.

Meta tensors have a device, a shape and a dtype but no data, so a CPU machine can run training steps and
evaluation with every tensor "on the device" for the price of the Python around the kernels. Meta itself
rejects what CUDA rejects in most ops (a CPU tensor in elementwise maths, ``cat``, ``where``) and every read
of a value by the host (``.item()``, ``bool(t)``, ``nonzero``, boolean masks). :class:`DeviceCheck`, a
``TorchFunctionMode``, flags what meta lets through but CUDA does not, or does only with a stall:

* ``cpu-tensor``: a CPU tensor with dimensions in an op on device tensors -- an index (a host copy and a
  stream synchronisation on CUDA), ``bucketize`` boundaries or a ``gather`` index (an error on CUDA);
* ``generator``: a random op on the device drawing from a CPU generator (an error on CUDA);
* ``host-read``: a read of a device value by the host, and data-dependent shapes (``nonzero``, boolean
  masks), recorded before meta raises so the finding names the line;
* ``nondeterministic``: an op whose CUDA kernel raises under ``deterministic=true``
  (``torch.use_deterministic_algorithms``), e.g. a weighted ``bincount``;
* ``rejected``: any other error meta raised (e.g. "Tensor on device cpu is not on the expected device").

Evaluation reads results back by design (once per head); inside :meth:`DeviceCheck.reading` such reads are
allowed and answered with zeros (ones for booleans) of the right shape. Two shims let the engine run on
meta at all: ``torch.autocast("meta")`` is mapped to the CPU's (which leaves meta tensors alone, so the
run is in effect fp32), and ``torch.Generator(device="meta")`` is a CPU generator that reports meta.
"""
from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DEVICE = "meta"
T = torch.Tensor

# Reads of a value by the host, and ops whose output shape depends on the data (a read in disguise).
READS = {T.item, T.tolist, T.numpy, T.__bool__, T.__float__, T.__int__, T.__index__, T.cpu, T.__array__}
DATA_DEPENDENT = {torch.nonzero, T.nonzero, torch.masked_select, T.masked_select, torch.unique, T.unique,
                  torch.argwhere, torch.unique_consecutive}
# Ops that move data between devices on purpose: a CPU tensor among their arguments is what they are for.
TRANSFERS = {T.to, T.copy_, T.cuda, T.type_as, T.new_tensor, T.set_, T.data.__set__,  # type: ignore[attr-defined]
             torch._has_compatible_shallow_copy_type}  # Module.to asks it before moving a parameter
HOST_READS = READS | DATA_DEPENDENT


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors among an op's arguments and inside its list / tuple arguments (indices, ``cat`` inputs)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def _requires_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(t.requires_grad for t in _tensors(args, kwargs))


def _float_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    t = args[0] if args else kwargs.get("input")
    dtype = kwargs.get("dtype") or getattr(t, "dtype", None)
    return dtype is not None and dtype.is_floating_point


# What raises on CUDA under torch.use_deterministic_algorithms(True) (its documentation's list), for the ops
# this project could plausibly call; each predicate says when.
NONDETERMINISTIC: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], bool]] = {
    torch.bincount: lambda a, k: (a[2] if len(a) > 2 else k.get("weights")) is not None,
    T.bincount: lambda a, k: (a[1] if len(a) > 1 else k.get("weights")) is not None,
    torch.histc: lambda a, k: True, T.histc: lambda a, k: True,
    torch.cumsum: _float_input, T.cumsum: _float_input,
    T.put_: lambda a, k: True,
    F.adaptive_avg_pool2d: lambda a, k: _requires_grad(a, k) and tuple(torch.nn.modules.utils._pair(a[1])) != (1, 1),
    F.adaptive_avg_pool3d: _requires_grad, F.adaptive_max_pool2d: _requires_grad, F.avg_pool3d: _requires_grad,
    F.grid_sample: _requires_grad,
    F.interpolate: lambda a, k: _requires_grad(a, k) and k.get("mode", "nearest") in ("linear", "bilinear",
                                                                                      "bicubic", "trilinear"),
    F.pad: lambda a, k: _requires_grad(a, k) and (a[2] if len(a) > 2 else k.get("mode")) == "reflect",
    F.nll_loss: lambda a, k: a[0].dim() > 2,  # the 2-D (spatial) kernel
    torch.median: lambda a, k: len(a) > 1 or "dim" in k, T.median: lambda a, k: len(a) > 1 or "dim" in k,
}


@dataclass(frozen=True)
class Finding:
    kind: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where}"


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _caller(frames: list[traceback.FrameSummary] | None = None) -> str:
    """The innermost frame in this project's code (the library, its benchmarks or the studies) of
    ``frames`` (default: the current stack)."""
    for frame in reversed(frames if frames is not None else traceback.extract_stack()[:-3]):
        if "/peerdistill/" in frame.filename or "/studies/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.line})"
    return "?"


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of ``t``'s shape and dtype to answer an allowed read (ones for booleans: 'finite')."""
    fill = torch.ones if t.dtype == torch.bool else torch.zeros
    return fill(t.shape, dtype=t.dtype)


class DeviceCheck(TorchFunctionMode):
    """Records every device problem of the code run inside it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.findings: list[Finding] = []
        self.reads_allowed = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Host reads are intended here (evaluation results): answered with stand-in values."""
        before, self.reads_allowed = self.reads_allowed, True
        try:
            yield
        finally:
            self.reads_allowed = before

    def flag(self, kind: str, func: Any) -> None:
        finding = Finding(kind, _name(func), _caller())
        if finding not in self.findings:
            self.findings.append(finding)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        on_device = [t for t in tensors if t.device.type == DEVICE]
        if on_device and (func in HOST_READS or func is T.to and _to_host(args, kwargs)):
            if self.reads_allowed and func not in DATA_DEPENDENT:
                return func(_stand_in(args[0]), *args[1:], **kwargs)
            self.flag("host-read", func)
        if on_device and func not in TRANSFERS and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.flag("cpu-tensor", func)
        gen = kwargs.get("generator")
        if gen is not None and gen.device.type != _target(args, kwargs, on_device):
            self.flag("generator", func)
        if on_device and func in NONDETERMINISTIC and NONDETERMINISTIC[func](args, kwargs):
            self.flag("nondeterministic", func)
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError, TypeError):
            if on_device:
                self.flag("rejected", func)
            raise


def _to_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``t.to("cpu")`` / ``t.to(torch.device("cpu"))`` (not a dtype-only ``to``)."""
    dev = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu"


def _target(args: tuple[Any, ...], kwargs: dict[str, Any], on_device: list[torch.Tensor]) -> str:
    """The device type a random op writes to: its ``device`` argument, else its tensors', else the CPU."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"]).type
    return DEVICE if on_device else "cpu"


class _Autocast(torch.autocast):
    """``torch.autocast`` that accepts the meta device (as the CPU's, which leaves meta tensors alone)."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == DEVICE else device_type, *args, **kwargs)


class _Generator(torch.Generator):
    """``torch.Generator(device="meta")``: a CPU generator that says it is on meta, as a device's own
    generator would be (meta has none); what it draws is never read."""

    def __new__(cls, device: str | torch.device = "cpu") -> _Generator:
        self = super().__new__(cls, "cpu")
        self._device = torch.device(device)
        return self

    def __init__(self, device: str | torch.device = "cpu") -> None:
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._device


@contextlib.contextmanager
def on_meta() -> Iterator[DeviceCheck]:
    """Run the block with the shims the engine needs on meta and a :class:`DeviceCheck` watching."""
    real = torch.autocast, torch.Generator
    torch.autocast, torch.Generator = _Autocast, _Generator  # type: ignore[misc]
    check = DeviceCheck()
    try:
        with check:
            yield check
    finally:
        torch.autocast, torch.Generator = real  # type: ignore[misc]


@dataclass
class MetaRun:
    """What :func:`run_engine` saw: the findings, and the trainable parameters (of the module DDP wraps)
    that some training step left without a gradient."""

    findings: list[Finding]
    no_grad: set[str]
    unused_declared: bool = False


def run_engine(cfg: Any, steps: int = 2, start: int = 1) -> MetaRun:
    """Build the run of ``cfg`` on meta, run its before-training hook, ``steps`` training steps from batch
    ``start`` of the epoch and an evaluation of every head (with reliability bins)."""
    from peerdistill.engine.trainer import Trainer

    cfg.device, cfg.precision = DEVICE, "fp32"
    run = MetaRun([], set())
    with on_meta() as check:
        try:
            tr = Trainer(cfg, None)
            run.unused_declared = tr.method.needs.unused_params or any(a.unused_params for a in tr.addons)
            tr.before_training()
            batches = list(tr.train_loader)
            tr.step = start
            for i in range(start, start + steps):
                tr.train_step(batches[i % len(batches)])
                run.no_grad |= {n for n, p in tr.module.named_parameters() if p.requires_grad and p.grad is None}
            with check.reading():
                tr._check_finite({"loss": torch.zeros((), device=DEVICE)})
                tr.evaluate(tr.data.test, with_reliability=True)
        except Exception as e:  # noqa: BLE001 - a failure on meta is a finding, reported with the others
            if not check.findings:
                check.findings.append(Finding("error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                                              _caller(traceback.extract_tb(e.__traceback__))))
    run.findings = check.findings
    return run
