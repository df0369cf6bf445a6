"""The search space of a sweep: which settings it names (task.* and training.* of the spec), the values the spec
checks, the spec with a trial's settings, and the validation metric it optimises."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines.core.sections import SpecView, SweepParameter

SECTIONS = ("task", "training")  # the spec's sections a sweep can search


def setting_path(name: str) -> tuple[str, list[str]]:
    """The section and the path inside it of a searched setting: 'task.label_smoothing' -> ('task',
    ['label_smoothing']), 'training.lora.r' -> ('training', ['lora', 'r']); a name without a section's prefix is
    a training setting ('learning_rate', 'lora.r')."""
    section, _, rest = name.partition(".")
    if section in SECTIONS and rest:
        return section, rest.split(".")
    return "training", name.split(".")


def sample_values(parameter: SweepParameter) -> list[Any]:
    """Values a parameter can take that the spec checks (its choices, or its range's ends)."""
    if parameter.choices is not None:
        return list(parameter.choices)
    return [parameter.low, parameter.high]


def with_settings(spec: SpecView, settings: Mapping[str, Any]) -> SpecView:
    """The spec with task and training settings replaced ({'task.label_smoothing': 0.1, 'learning_rate': 1e-3,
    'lora.r': 16}; see setting_path), validated again. A KeyError names the section that lacks a setting."""
    from pydantic import ValidationError

    data = {**spec.model_dump(mode="json"), "sweep": None}  # the settings chosen: no search left in this spec
    for dotted, value in settings.items():
        section, path = setting_path(dotted)
        if path == ["type"] and section == "task":
            raise KeyError("task.type names the task: a sweep searches settings, not task types")
        node = data[section]
        *parents, leaf = path
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"{section} has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"{section}{'.' + '.'.join(parents) if parents else ''} has no setting {leaf!r}")
        node[leaf] = value
    try:
        return type(spec).model_validate(data)
    except ValidationError as exc:  # pydantic names the field and what it expected
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from None


def sweep_metric(spec: SpecView) -> tuple[str, str]:
    """(validation metric, direction) the spec's sweep optimises."""
    from pipelines.core.tasks import task_named

    metrics = task_named(spec.task.type).sweep_metrics
    metric = spec.sweep.metric or (spec.evaluation.primary_metric if spec.evaluation.primary_metric in metrics
                                   else next(iter(metrics)))
    if metric not in metrics:
        raise ValueError(f"sweep.metric {metric!r} is not a validation metric of task.type {spec.task.type}: use one "
                         f"of {sorted(metrics)}")
    return metric, metrics[metric]


def spec_settings(spec: SpecView) -> dict[str, Any] | None:
    """The spec's own values of the searched settings (task.* and training.*), when every one lies in the search
    space."""
    sections = {section: getattr(spec, section).model_dump(mode="json") for section in SECTIONS}
    found: dict[str, Any] = {}
    for name, parameter in spec.sweep.space.items():
        section, path = setting_path(name)
        value: Any = sections[section]
        for part in path:
            value = value[part]
        # An unset value (None: the setting's default applies) lies in no range.
        inside = (value in parameter.choices if parameter.choices is not None
                  else value is not None and parameter.low <= value <= parameter.high)
        if not inside:
            return None
        integral = isinstance(parameter.low, int) and isinstance(parameter.high, int)
        found[name] = int(value) if integral and float(value).is_integer() else value
    return found


def suggest(trial: Any, name: str, parameter: SweepParameter) -> Any:
    if parameter.choices is not None:
        return trial.suggest_categorical(name, list(parameter.choices))
    if isinstance(parameter.low, int) and isinstance(parameter.high, int) and not isinstance(parameter.low, bool):
        return trial.suggest_int(name, parameter.low, parameter.high, log=parameter.log)
    return trial.suggest_float(name, float(parameter.low), float(parameter.high), log=parameter.log)
