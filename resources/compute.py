"""Which device and precision training and inference use on this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import torch

from pipelines.core.trainer import ComputeSettings


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX); autocast is then faster."""
    if sys.platform != "linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


class ComputeResource(dg.ConfigurableResource):
    """Device and thread settings; the precision is chosen per spec ('auto' picks bf16 when supported)."""

    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # None: torch's default (all cores)
    cache_dir: str | None = None  # where frozen-model embeddings are kept for reuse across steps (None: not kept)

    def settings(self, precision: str) -> ComputeSettings:
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("ComputeResource.device is 'cuda' but torch sees no CUDA device")
        if precision == "auto":
            supported = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_supports_bf16()
            precision = "bf16" if supported else "fp32"
        return ComputeSettings(device=device, precision=precision, num_threads=self.num_threads,
                               cache_dir=self.cache_dir)
