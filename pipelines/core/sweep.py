"""Sweeps: a hyperparameter search over training settings with Optuna, before the fine-tuning that counts. This
module holds what the spec needs to check a `sweep:` section and the record of a sweep; pipelines/core/sweeping.py
runs one.

Each trial trains the spec with its sampled settings (TPE sampler) on the train split and is scored by the best
per-epoch validation metric; the median pruner stops a trial whose metric after an epoch falls below the median
of earlier trials there. The test split is never read. Trials run in `sweep.parallel` worker processes that share
the study through its storage (an SQLite file of the instance, or the instance's PostgreSQL database) and the
machine's threads. Each trial is an MLflow child run of the sweep's run: its settings as params, its per-epoch
metrics, its duration and how it ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipelines.core.errors import TunelineError

TRIAL_COLUMNS = ("trial", "state", "value", "seconds", "epochs_run")


class SweepError(TunelineError):
    """A sweep that could not find any settings (every trial failed)."""


class TrialRuns(Protocol):
    """Where each trial is tracked (an MLflow child run of the sweep's run, in resources/tracking.py). It is handed
    to the worker processes, so it must pickle."""

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """A new run for a trial; returns its id."""
        ...

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None: ...

    def end(self, run_id: str, status: str, seconds: float) -> None:
        """status: FINISHED, KILLED (pruned) or FAILED."""
        ...


def sample_values(parameter: Any) -> list[Any]:
    """Values a parameter can take that the spec checks (its choices, or its range's ends)."""
    if parameter.choices is not None:
        return list(parameter.choices)
    return [parameter.low, parameter.high]


def with_settings(spec: Any, settings: Mapping[str, Any]) -> Any:
    """The spec with training settings replaced ({'learning_rate': 1e-3, 'lora.r': 16}), validated again.
    A KeyError names a setting the training section does not have."""
    from pydantic import ValidationError

    data = {**spec.model_dump(mode="json"), "sweep": None}  # the settings chosen: no search left in this spec
    for dotted, value in settings.items():
        node = data["training"]
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"training has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"training{'.' + '.'.join(parents) if parents else ''} has no setting {leaf!r}")
        node[leaf] = value
    try:
        return type(spec).model_validate(data)
    except ValidationError as exc:  # pydantic names the field and what it expected
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from None


def sweep_metric(spec: Any) -> tuple[str, str]:
    """(validation metric, direction) the spec's sweep optimises."""
    from pipelines.core.tasks import task_named

    metrics = task_named(spec.task.type).sweep_metrics
    metric = spec.sweep.metric or (spec.evaluation.primary_metric if spec.evaluation.primary_metric in metrics
                                   else next(iter(metrics)))
    if metric not in metrics:
        raise ValueError(f"sweep.metric {metric!r} is not a validation metric of task.type {spec.task.type}: use one "
                         f"of {sorted(metrics)}")
    return metric, metrics[metric]


def spec_settings(spec: Any) -> dict[str, Any] | None:
    """The spec's own values of the searched settings, when every one lies in the search space."""
    training = spec.training.model_dump(mode="json")
    found: dict[str, Any] = {}
    for name, parameter in spec.sweep.space.items():
        value: Any = training
        for part in name.split("."):
            value = value[part]
        inside = (value in parameter.choices if parameter.choices is not None
                  else parameter.low <= value <= parameter.high)
        if not inside:
            return None
        integral = isinstance(parameter.low, int) and isinstance(parameter.high, int)
        found[name] = int(value) if integral and float(value).is_integer() else value
    return found


def suggest(trial: Any, name: str, parameter: Any) -> Any:
    if parameter.choices is not None:
        return trial.suggest_categorical(name, list(parameter.choices))
    if isinstance(parameter.low, int) and isinstance(parameter.high, int) and not isinstance(parameter.low, bool):
        return trial.suggest_int(name, parameter.low, parameter.high, log=parameter.log)
    return trial.suggest_float(name, float(parameter.low), float(parameter.high), log=parameter.log)


@dataclass(frozen=True)
class SweepRecord:
    """What a sweep found: the best settings and every trial, as the sweep asset hands them to training."""

    study: str
    storage: str  # where the study lives, without a password
    metric: str
    direction: str
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    trials: tuple[dict[str, Any], ...]
    seconds: float
    importances: dict[str, float] = field(default_factory=dict)
    plot: str | None = None

    def table_markdown(self) -> str:
        from pipelines.core.evaluation import markdown_table

        names = sorted({k for t in self.trials for k in t["params"]})
        return markdown_table(
            ["trial", "state", f"validation {self.metric}", "seconds", "epochs run", *names],
            [[t["trial"], ("**best** " if t["trial"] == self.best_trial else "") + t["state"],
              "—" if t["value"] is None else f"{t['value']:.4f}", f"{t['seconds']:.0f}", t["epochs_run"],
              *[_fmt(t["params"].get(n)) for n in names]] for t in self.trials], limit=200)


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


