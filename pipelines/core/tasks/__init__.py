"""The task types tuneline knows: task.type -> Task. Adding a task type is one module and one line here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.core.records import CheckpointRecord
from pipelines.core.tasks.base import CandidateRejected, PreparedData, ProbeResult, Task
from pipelines.core.tasks.classification import ClassificationTask
from pipelines.core.tasks.instruction import InstructionTuningTask
from pipelines.core.trainer import record_from_folder

TASKS: dict[str, Task] = {task.name: task for task in (
    ClassificationTask(),
    InstructionTuningTask(),
)}
DEFAULT_TASK = ClassificationTask.name  # a spec whose task section names no type


def task_named(name: str) -> Task:
    """The task registered under `name`; a KeyError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task.type {name!r}; known task types: {sorted(TASKS)}") from None


def task_for(spec: Any) -> Task:
    """The task of a pipeline spec (anything with `.task.type`), of a checkpoint record (`.task`), or a name."""
    if isinstance(spec, str):
        return task_named(spec)
    section = getattr(spec, "task", None)
    return task_named(section if isinstance(section, str) else section.type)  # type: ignore[union-attr]


def checkpoint_from_folder(path: Path, model_version: str | None = None) -> CheckpointRecord:
    """The record of a checkpoint folder (e.g. downloaded from the model registry), of any task."""
    legacy = {task.legacy_metadata_file: (task.name, task.weight_files) for task in TASKS.values()}
    return record_from_folder(path, model_version, legacy)


__all__ = ["DEFAULT_TASK", "TASKS", "CandidateRejected", "PreparedData", "ProbeResult", "Task", "checkpoint_from_folder", "task_for",
           "task_named"]
