"""Which device and precision this machine computes in: device 'auto' is CUDA when torch sees it, precision 'auto'
is bf16 only where its matrix products measure faster than fp32. No Dagster import: benchmarks resolve the
compute settings as a pipeline run does. torch is imported when settings are resolved, not with the module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.core.training.compute import ComputeSettings
from pipelines.core.training.cost import matmul_rate


def cpuinfo_lines() -> list[str]:
    """The lines of /proc/cpuinfo (none off Linux, or where it cannot be read)."""
    if sys.platform != "linux":
        return []
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX)."""
    flags = "\n".join(cpuinfo_lines())
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


BF16_MIN_SPEEDUP = 1.25  # precision 'auto' on a CPU takes bf16 only when its matmuls are this much faster than fp32


def cpu_bf16_speedup(num_threads: int | None = None) -> float:
    """How much faster this CPU multiplies bf16 matrices than fp32 ones (measured once per process).

    The instruction flags do not say: with AMX, bf16 products run several times faster than fp32; on a CPU with
    AVX512-BF16 but no AMX they can run at half the speed of fp32, so bf16 autocast there would slow every training
    and inference step."""
    return (matmul_rate(ComputeSettings("cpu", "bf16", num_threads))
            / matmul_rate(ComputeSettings("cpu", "fp32", num_threads)))


def auto_precision(device: str, num_threads: int | None = None) -> str:
    """bf16 where it pays: a GPU that supports it, a CPU whose bf16 matmuls are measurably faster than fp32."""
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() and cpu_bf16_speedup(num_threads) >= BF16_MIN_SPEEDUP else "fp32"


def usable_cores() -> int:
    """The cores this process may run on (a container's or a taskset's CPU set, not every core of the node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_compute(device: str, precision: str, num_threads: int | None = None, cache_dir: str | None = None,
                    world_size: int = 1) -> ComputeSettings:
    """Settings for this machine: device 'auto' picks CUDA when torch sees it, precision 'auto' bf16 where it is
    faster (auto_precision)."""
    import torch  # here, not at import: building the Dagster definitions needs no torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ComputeResource.device is 'cuda' but torch sees no CUDA device")
    if precision == "auto":
        precision = auto_precision(device, num_threads)
    return ComputeSettings(device=device, precision=precision, num_threads=num_threads, cache_dir=cache_dir,
                           world_size=world_size)
