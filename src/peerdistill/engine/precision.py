"""Device, precision and memory-format choices, automatic and overridable (DESIGN §7)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ..errors import PeerdistillError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PeerdistillError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PeerdistillError("device cuda requested but no CUDA device is available")
    return dev


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast is much faster than fp32 on the CPU."""
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
                    or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 (Ampere) or newer on ``device`` itself, or ROCm. Pre-Ampere GPUs run bf16
    only by emulation (``torch.cuda.is_bf16_supported()`` counts that, and asks the current device), far
    slower than fp16 with a gradient scaler."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass
class Precision:
    """Resolved autocast settings for one device."""

    dtype: torch.dtype | None  # None = fp32, no autocast
    device_type: str
    use_scaler: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs with native bf16 (Ampere or newer) and CPUs with native bf16, fp16 + scaler
    on older GPUs, fp32 elsewhere."""
    if name not in PRECISIONS:
        raise PeerdistillError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda:
            name = "bf16" if cuda_has_native_bf16(device) else "fp16"
        else:
            name = "bf16" if cpu_has_native_bf16() else "fp32"
    if name == "fp16" and not cuda:
        raise PeerdistillError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(dtype, device.type, use_scaler=name == "fp16")


def resolve_channels_last(setting: bool | None, device: torch.device, precision: Precision) -> bool:
    """``channels_last=auto`` (``None``): on the CPU always (measured faster there in fp32 and bf16,
    docs/performance.md); on a GPU only under bf16 / fp16 autocast, whose tensor-core convolutions are
    NHWC kernels, while cuDNN's fp32 convolutions are NCHW-native and can be slower in channels_last."""
    if setting is not None:
        return setting
    return device.type != "cuda" or precision.dtype is not None


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Algorithm selection for the run. ``deterministic``: only deterministic kernels (torch raises on an
    op that has none), cuDNN's deterministic convolutions without autotuning and cuBLAS's fixed
    workspace, so a run and its resume repeat bit for bit on a GPU too, at a cost in speed. Otherwise, on
    CUDA, cuDNN autotunes each convolution shape once (``cudnn.benchmark``): the shapes are fixed."""
    if deterministic and device.type == "cuda":
        # Read by cuBLAS when its handle is created; torch refuses deterministic GEMMs without it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
