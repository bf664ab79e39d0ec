"""Devices, precision and hardware accounting.

``resolve_device("auto")`` picks CUDA, then MPS, then CPU. ``choose_precision`` decides the
autocast dtype per device: bf16 on CUDA devices that support it (fp16 with a gradient scaler
on older ones), fp32 on CPU unless bf16 is asked for (and the CPU can do it), fp32 on MPS
unless fp16 is asked for. ``peak_flops`` looks up the device's dense bf16/fp16 peak for model
FLOPs utilisation (MFU); a flag overrides it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from moorelm.errors import MoorelmError

# Dense (no sparsity) peak FLOP/s of the tensor cores at bf16/fp16, from vendor data sheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise MoorelmError("device 'mps' is not available on this machine; use --device cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MoorelmError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
        if ":" in name:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise MoorelmError(f"device {name!r} is not valid; use cuda:N with N a number") from None
            if not 0 <= index < torch.cuda.device_count():
                raise MoorelmError(
                    f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
                )
            return torch.device("cuda", index)
        return torch.device("cuda")
    raise MoorelmError(f"device {name!r} is not valid; choose auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None  # None: plain fp32
    use_scaler: bool  # fp16 needs loss scaling

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]


def choose_precision(device: torch.device, requested: str = "auto",
                     cuda_bf16: bool | None = None) -> Precision:
    """Autocast dtype for a device. ``cuda_bf16`` overrides the capability check (tests)."""
    kind = device.type
    if kind == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if requested == "fp32":
            return Precision(None, False)
        if requested == "fp16" or (requested in ("auto", "bf16") and not bf16_ok):
            return Precision(torch.float16, True)
        return Precision(torch.bfloat16, False)
    if kind == "mps":
        if requested == "fp16":
            return Precision(torch.float16, False)
        if requested == "bf16":
            raise MoorelmError("bf16 is not supported on MPS; use --dtype fp16 or fp32")
        return Precision(None, False)
    # CPU
    if requested == "bf16":
        return Precision(torch.bfloat16, False)
    if requested == "fp16":
        raise MoorelmError("fp16 training is not supported on CPU; use --dtype bf16 or fp32")
    return Precision(None, False)


def autocast(device: torch.device, precision: Precision):
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast)


def setup_device(device: torch.device) -> None:
    """Per-device switches that pay for themselves."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 paths use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device, override: float | None = None,
               name: str | None = None) -> float | None:
    """Peak FLOP/s for MFU: the override, else the table by device name, else None."""
    if override:
        return float(override)
    if device.type != "cuda" and name is None:
        return None
    name = name or device_name(device)
    # longest key first, so "H100 PCIe" wins over "H100"
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_FLOPS[key]
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_second / peak


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
        except (ImportError, OSError):
            return None
    return None
