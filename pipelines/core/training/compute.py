"""What training code is handed from outside: the resolved compute settings, the progress callable and the metrics
sink. Light on purpose (no torch at import time): the task registry and the spec import it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

ProgressFn = Callable[[str], None]


class MetricsSink(Protocol):
    """Where training metrics go (an experiment tracker, a list in a test)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...


@dataclass(frozen=True)
class ComputeSettings:
    """Resolved device, precision and thread count for one piece of work."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # bf16 | fp32
    num_threads: int | None = None
    cache_dir: str | None = None  # where results worth reusing across steps are kept (frozen embeddings); None: none
    world_size: int = 1  # data-parallel training processes (torchrun); each takes batch_size / world_size rows a step

    def apply(self) -> None:
        if self.num_threads:
            import torch

            torch.set_num_threads(self.num_threads)

    def autocast(self) -> Any:
        if self.precision == "bf16":
            import torch

            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return nullcontext()
