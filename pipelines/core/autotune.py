"""`training.precision: auto` and the thread count, chosen by timing a few real training steps of the chosen model
on this machine, and kept per machine and model so that the next run reads the answer instead of timing again.

A matrix product alone does not say which precision trains faster: a LoRA step of a small model spends much of its
time outside large products (casts, element-wise work, the optimizer), and bf16 autocast adds casts to every layer.
So the step is timed as training runs it (the task's own `time_train_step`: the real model, its LoRA layers, a batch
of real train rows), in each precision the device supports and with all cores or half of them. No Dagster import:
benchmarks choose as a pipeline run does."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.core.files import write_bytes_atomic
from pipelines.core.hardware import cpu_supports_bf16, cpuinfo_lines, usable_cores
from pipelines.core.training.compute import ComputeSettings, ProgressFn

TIMED_STEPS = 3  # timed steps per setting, after one warm-up step; the median counts
BF16_MIN_STEP_SPEEDUP = 1.1  # bf16 is taken only when its steps are this much faster than fp32's
CACHE_VERSION = 1  # bump when what is timed changes, so that older answers are timed again


@dataclass(frozen=True)
class ComputeChoice:
    """The settings training runs with, and how they were chosen."""

    settings: ComputeSettings
    chosen_by: str  # "timed" | "cached" | "asked" (nothing left to choose) | "estimate" (timing failed)
    timings: tuple[dict[str, Any], ...] = ()  # {"precision", "threads", "seconds_per_step"} per setting timed
    note: str = ""
    cache_file: str | None = None

    def table(self) -> str:
        """The timed settings as a Markdown table, the chosen one marked."""
        if not self.timings:
            return f"{self.settings.precision}, {self.settings.num_threads or 'all'} threads ({self.chosen_by})"
        fastest = min(t["seconds_per_step"] for t in self.timings)
        lines = ["| precision | threads | s/step | vs fastest | chosen |", "| --- | --- | --- | --- | --- |"]
        for t in self.timings:
            chosen = t["precision"] == self.settings.precision and t["threads"] == self.settings.num_threads
            lines.append(f"| {t['precision']} | {t['threads'] or 'all'} | {t['seconds_per_step']:.4f} | "
                         f"{t['seconds_per_step'] / fastest:.2f}x | {'yes' if chosen else ''} |")
        return "\n".join(lines)

    def summary(self) -> str:
        threads = self.settings.num_threads or "all"
        if self.chosen_by in ("timed", "cached"):
            by = "timed now" if self.chosen_by == "timed" else f"timed before on this machine ({self.cache_file})"
            steps = ", ".join(f"{t['precision']} x{t['threads'] or 'all'} {t['seconds_per_step']:.3f} s"
                              for t in self.timings)
            return (f"training in {self.settings.precision} on {threads} threads: the fastest of [{steps}] per step, "
                    f"{by}")
        note = f": {self.note}" if self.note else ""
        return f"training in {self.settings.precision} on {threads} threads ({self.chosen_by}{note})"


def machine_fingerprint(device: str) -> dict[str, Any]:
    """What a step's speed depends on besides the model: the processor (model name and instruction flags), the
    cores this process may use, the accelerator, and the torch build."""
    import torch

    cpu, flags = "", ""
    for line in cpuinfo_lines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and not cpu:
            cpu = value.strip()
        elif name.strip() == "flags" and not flags:
            flags = " ".join(sorted(value.split()))
    fingerprint = {"cpu": cpu or platform.processor() or platform.machine(),
                   "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
                   "cores": usable_cores(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        fingerprint["gpu"] = torch.cuda.get_device_name()
        fingerprint["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return fingerprint


def precision_options(device: str, asked: str) -> list[str]:
    """The precisions to time: the one asked for, or under 'auto' fp32 and (where the device has it) bf16."""
    if asked != "auto":
        return [asked]
    if device == "cuda":
        import torch

        return ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    return ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]


def thread_options(device: str, asked: int | None, cores: int | None = None) -> list[int | None]:
    """The thread counts to time: the one asked for, or on a CPU all usable cores and half of them (hyperthreads
    share a core's units, and small steps can lose more to synchronization than they gain). None: torch's own."""
    if asked is not None or device != "cpu":
        return [asked]
    cores = cores or usable_cores()
    return sorted({cores, max(1, cores // 2)}, reverse=True)


def choose(timings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The setting to train with: the fastest fp32 one, unless a bf16 one is BF16_MIN_STEP_SPEEDUP faster (bf16
    rounds every product: it has to pay for that)."""
    fp32 = [t for t in timings if t["precision"] == "fp32"]
    best = min(timings, key=lambda t: t["seconds_per_step"])
    if not fp32 or best["precision"] == "fp32":
        return best
    best_fp32 = min(fp32, key=lambda t: t["seconds_per_step"])
    return best if best_fp32["seconds_per_step"] / best["seconds_per_step"] >= BF16_MIN_STEP_SPEEDUP else best_fp32


def choose_compute(time_step: Callable[[ComputeSettings], float], base: ComputeSettings, *, precision: str,
                   model_key: dict[str, Any], progress: ProgressFn = print,
                   threads: Sequence[int | None] | None = None) -> ComputeChoice:
    """Time `time_step` (seconds per training step under the settings it is given) for every precision and thread
    count left open, and return the fastest (see `choose`). `base` holds the device, the thread count asked for (None:
    open) and the cache folder; `model_key` says what the step's speed depends on besides the machine (the model's
    digest, batch size, length, adapters). The answer is kept in `base.cache_dir`/compute, keyed by both."""
    precisions = precision_options(base.device, precision)
    thread_counts = list(threads) if threads is not None else thread_options(base.device, base.num_threads)
    if len(precisions) * len(thread_counts) == 1:
        return ComputeChoice(replace(base, precision=precisions[0], num_threads=thread_counts[0]), "asked")
    machine = machine_fingerprint(base.device)
    key = {"version": CACHE_VERSION, "machine": machine, "model": model_key, "precisions": precisions,
           "threads": thread_counts}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(base.cache_dir) / "compute" / f"{digest}.json" if base.cache_dir else None
    if path is not None and path.is_file():
        try:
            timings = json.loads(path.read_text(encoding="utf-8"))["timings"]
            best = choose(timings)
            return ComputeChoice(replace(base, precision=best["precision"], num_threads=best["threads"]), "cached",
                                 tuple(timings), cache_file=str(path))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: timed again and rewritten
    import torch

    previous = torch.get_num_threads()
    timings = []
    try:
        for count in thread_counts:
            for name in precisions:
                settings = replace(base, precision=name, num_threads=count)
                torch.set_num_threads(count or previous)
                progress(f"timing {TIMED_STEPS} training steps in {name} on {count or 'all'} threads")
                timings.append({"precision": name, "threads": count,
                                "seconds_per_step": float(time_step(settings))})
    finally:
        torch.set_num_threads(previous)
    best = choose(timings)
    if path is not None:
        try:
            write_bytes_atomic(path, json.dumps({**key, "timings": timings}, indent=1, default=str).encode())
        except OSError:  # a cache that cannot be written costs the next run a few steps, never the result
            path = None
    return ComputeChoice(replace(base, precision=best["precision"], num_threads=best["threads"]), "timed",
                         tuple(timings), cache_file=str(path) if path else None)


# training settings that do not change how long a step takes: changing them keeps the cached answer
_STEP_NEUTRAL = {"epochs", "learning_rate", "seed", "warmup_fraction", "weight_decay", "average_last_epochs",
                 "early_stopping_patience", "precision", "logging_steps", "checkpoint_every"}


def step_key(spec: Any, base: Any) -> dict[str, Any]:
    """What a training step's speed depends on besides the machine: the task, the model's weights and the training
    settings that shape a step (batch size, length, adapters, dropout...)."""
    training = {k: v for k, v in spec.training.model_dump(mode="json").items() if k not in _STEP_NEUTRAL}
    return {"task": spec.task.type, "weights_sha256": base.weights_sha256, "training": training}


def tune_training_compute(task: Any, spec: Any, data: Any, base: Any, unresolved: ComputeSettings, *,
                          progress: ProgressFn = print, threads: Sequence[int | None] | None = None,
                          fallback: Callable[[], ComputeSettings] | None = None) -> ComputeChoice:
    """The compute settings to train `spec` on `base` with: `unresolved` holds the device (resolved), the thread
    count asked for (None: timed) and the cache folder; `spec.training.precision` 'auto' is timed. Timing runs the
    task's own `time_train_step` on `data`'s train rows. When timing fails (a step that does not fit in memory,
    a data set the step cannot sample), `fallback` (the matrix-product estimate) decides and the note says why."""

    def time_step(settings: ComputeSettings) -> float:
        return task.time_train_step(base, spec, data, settings, TIMED_STEPS)

    try:
        return choose_compute(time_step, unresolved, precision=spec.training.precision,
                              model_key=step_key(spec, base), progress=progress, threads=threads)
    except Exception as exc:  # the estimate still trains; the note says why timing did not decide
        if fallback is None:
            raise
        note = f"timing training steps failed ({type(exc).__name__}: {exc}); chosen by the matrix-product estimate"
        progress(note)
        return ComputeChoice(fallback(), "estimate", note=note)
