"""What this machine has, and which number format (dtype) training should use on it.

``detect_hardware()`` asks torch once and returns a frozen ``Hardware``. The decisions themselves are
pure functions of plain facts (device kind, CUDA compute capability), so they are tested without a GPU:

- CUDA with compute capability >= 8.0 (A100, H100, RTX 30xx/40xx): bf16, as Tulu 3 trains.
- CUDA below 8.0 (a Colab T4 is 7.5, a V100 7.0): fp16; these GPUs have no bf16 tensor cores.
- CPU: fp32; common CPUs have no fast bf16 arithmetic, so bf16 would only be slower.
- Apple MPS: fp32; mixed precision training there is incomplete.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Hardware:
    """The facts the profiles need about a machine. Build with ``detect_hardware`` or ``hardware_from_facts``."""

    device: str  # "cpu" | "cuda" | "mps"
    n_devices: int  # GPUs on CUDA, else 1
    device_name: str
    memory_gib: float | None  # per GPU on CUDA; total RAM on CPU and MPS (None when unknown)
    cpu_cores: int
    bf16_supported: bool  # fast bf16 arithmetic on this device
    dtype: str  # "bf16" | "fp16" | "fp32": what training will use
    dtype_reason: str  # one line saying why
    compute_capability: tuple[int, int] | None = None  # CUDA only


def cuda_supports_bf16(compute_capability: tuple[int, int]) -> bool:
    """bf16 tensor cores arrived with Ampere, compute capability 8.0."""
    return tuple(compute_capability) >= (8, 0)


def explain_dtype(
    device: str, compute_capability: tuple[int, int] | None = None, override: str | None = None
) -> tuple[str, str]:
    """``(dtype, reason)``: bf16 on CUDA >= 8.0, fp16 on older CUDA, fp32 on CPU and MPS, or ``override``."""
    if override is not None:
        if override not in DTYPES:
            raise ValueError(f"unknown dtype {override!r}; use one of {', '.join(DTYPES)}")
        return override, "asked for explicitly"
    if device == "cuda":
        if compute_capability is None:
            raise ValueError("CUDA needs a compute capability to pick a dtype, e.g. (8, 0)")
        cc = f"{compute_capability[0]}.{compute_capability[1]}"
        if cuda_supports_bf16(compute_capability):
            return "bf16", f"CUDA compute capability {cc} >= 8.0 has bf16 tensor cores"
        return "fp16", f"CUDA compute capability {cc} < 8.0 has no bf16 tensor cores (e.g. T4, V100)"
    if device == "cpu":
        return "fp32", "CPU: no fast bf16 arithmetic on common CPUs"
    if device == "mps":
        return "fp32", "Apple MPS: mixed precision training is incomplete there"
    raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")


def total_ram_gib() -> float | None:
    """Physical memory of this machine in GiB, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, OSError, ValueError):
        return None


def hardware_from_facts(
    device: str,
    n_devices: int = 1,
    device_name: str = "",
    memory_gib: float | None = None,
    cpu_cores: int = 1,
    compute_capability: tuple[int, int] | None = None,
    dtype: str | None = None,
) -> Hardware:
    """A ``Hardware`` from plain facts, with bf16 support and dtype derived by the rules above."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}")
    cc = tuple(compute_capability) if compute_capability is not None else None
    chosen, reason = explain_dtype(device, cc, dtype)
    return Hardware(
        device=device,
        n_devices=n_devices,
        device_name=device_name or device,
        memory_gib=memory_gib,
        cpu_cores=cpu_cores,
        bf16_supported=device == "cuda" and cc is not None and cuda_supports_bf16(cc),
        dtype=chosen,
        dtype_reason=reason,
        compute_capability=cc,
    )


def detect_hardware(dtype: str | None = None) -> Hardware:
    """Look at this machine (via torch) and return its ``Hardware``; ``dtype`` forces a format."""
    import torch

    # the cores this process may use (container and affinity limits included)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return hardware_from_facts(
            "cuda",
            n_devices=torch.cuda.device_count(),
            device_name=props.name,
            memory_gib=props.total_memory / 2**30,
            cpu_cores=cores,
            compute_capability=(props.major, props.minor),
            dtype=dtype,
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        device, name = "mps", "Apple MPS"
    else:
        device, name = "cpu", platform.processor() or platform.machine() or "CPU"
    return hardware_from_facts(
        device, device_name=name, memory_gib=total_ram_gib(), cpu_cores=cores, dtype=dtype
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def hardware_report(hw: Hardware) -> str:
    """A few lines for a notebook's versions/device cell: device, memory, cores, dtype and why, versions."""
    cc = hw.compute_capability
    capability = f", compute capability {cc[0]}.{cc[1]}" if cc else ""
    memory = "unknown"
    if hw.memory_gib is not None:
        memory = f"{hw.memory_gib:.1f} GiB " + ("per GPU" if hw.device == "cuda" else "RAM")
    return (
        f"device    : {hw.device} x{hw.n_devices} ({hw.device_name}{capability})\n"
        f"memory    : {memory}\n"
        f"cpu cores : {hw.cpu_cores}\n"
        f"dtype     : {hw.dtype} ({hw.dtype_reason})\n"
        f"versions  : torch {_version('torch')}, transformers {_version('transformers')}"
    )
