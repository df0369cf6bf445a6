"""The record of a sweep (what it found, every trial) and the protocol its trials are tracked through."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipelines.core.errors import TunelineError
from pipelines.core.markdown import markdown_table

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
        names = sorted({k for t in self.trials for k in t["params"]})
        return markdown_table(
            ["trial", "state", f"validation {self.metric}", "seconds", "epochs run", *names],
            [[t["trial"], ("**best** " if t["trial"] == self.best_trial else "") + t["state"],
              "—" if t["value"] is None else f"{t['value']:.4f}", f"{t['seconds']:.0f}", t["epochs_run"],
              *[_fmt(t["params"].get(n)) for n in names]] for t in self.trials], limit=200)


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
