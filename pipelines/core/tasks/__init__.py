"""The task types tuneline knows: task.type -> Task.

The registry holds light declarations (name, `task:` section class, description, where the implementation
lives). An implementation, with torch and transformers behind it, is imported only when a step asks for it
(`task_named`, `task_for`), so loading and validating a spec imports neither. Adding a task type is one package
in this folder and one `register` line below (or a `register` call, as the tests do for a task of their own).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core.tasks.base import (CandidateRejected, PreparedData, ProbeResult, Starter, Task, TaskBase,
                                       TaskDeclaration)
from pipelines.core.tasks.classification import TASK as _CLASSIFICATION
from pipelines.core.tasks.embedding import TASK as _EMBEDDING
from pipelines.core.tasks.instruction import TASK as _INSTRUCTION
from pipelines.core.tasks.preference import TASK as _PREFERENCE

if TYPE_CHECKING:
    from pipelines.core.records import CheckpointRecord

_DECLARATIONS: dict[str, TaskDeclaration] = {}
_LOADED: dict[str, Task] = {}
_STARTERS: dict[str, Starter] = {}
_LISTENERS: list[Callable[[], None]] = []


def register(declaration: TaskDeclaration) -> None:
    """Make a task type known (a spec may then name it in task.type). Registering a name again replaces it."""
    _DECLARATIONS[declaration.name] = declaration
    _LOADED.pop(declaration.name, None)
    _STARTERS.pop(declaration.name, None)
    for listener in _LISTENERS:
        listener()


def unregister(name: str) -> None:
    """Forget a task type (a test's own task, once the test is done)."""
    _DECLARATIONS.pop(name, None)
    _LOADED.pop(name, None)
    _STARTERS.pop(name, None)
    for listener in _LISTENERS:
        listener()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` whenever a task type is registered or forgotten (the spec schema rebuilds its union)."""
    _LISTENERS.append(listener)


def declarations() -> Mapping[str, TaskDeclaration]:
    """Every registered task type's declaration, by name, in registration order."""
    return dict(_DECLARATIONS)


def declaration(name: str) -> TaskDeclaration:
    """The declaration registered under `name`; a KeyError lists the known ones."""
    try:
        return _DECLARATIONS[name]
    except KeyError:
        raise KeyError(f"unknown task.type {name!r}; known task types: {sorted(_DECLARATIONS)}") from None


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def task_named(name: str) -> Task:
    """The task registered under `name` (its implementation imported on first use); a KeyError lists the known
    ones."""
    if name not in _LOADED:
        found = declaration(name)
        task = _load(found.implementation)()
        if task.name != name or task.config_class is not found.config_class:
            raise TypeError(f"{found.implementation} does not implement task.type {name!r} with "
                            f"{found.config_class.__name__}")
        _LOADED[name] = task
    return _LOADED[name]


def task_for(spec: Any) -> Task:
    """The task of a pipeline spec (anything with `.task.type`), of a checkpoint record (`.task`), or a name."""
    if isinstance(spec, str):
        return task_named(spec)
    section = getattr(spec, "task", None)
    return task_named(section if isinstance(section, str) else section.type)  # type: ignore[union-attr]


def starter_named(name: str) -> Starter:
    """How `tuneline init` proposes a spec of task type `name`: its column guesses, starter sections and data
    warnings (the task package's light `init` module: no torch)."""
    if name not in _STARTERS:
        _STARTERS[name] = _load(declaration(name).starter)()
    return _STARTERS[name]


def checkpoint_from_folder(path: Path, model_version: str | None = None,
                           base_path: Path | None = None) -> CheckpointRecord:
    """The record of a checkpoint folder (e.g. downloaded from the model registry), of any task; `base_path`: a
    copy of its base model to read instead of the folder it was trained from."""
    from pipelines.core.training.checkpoints import record_from_folder

    legacy = {task.legacy_metadata_file: (task.name, task.weight_files)
              for task in map(task_named, _DECLARATIONS) if task.legacy_metadata_file}
    return record_from_folder(path, model_version, legacy, base_path)


for _builtin in (_CLASSIFICATION, _INSTRUCTION, _EMBEDDING, _PREFERENCE):
    register(_builtin)
DEFAULT_TASK = _CLASSIFICATION.name  # a spec whose task section names no type

__all__ = ["DEFAULT_TASK", "CandidateRejected", "PreparedData", "ProbeResult", "Starter", "Task", "TaskBase",
           "TaskDeclaration", "checkpoint_from_folder", "declaration", "declarations", "on_change", "register",
           "starter_named", "task_for", "task_named", "unregister"]
