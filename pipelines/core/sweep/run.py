"""Running a sweep (pipelines/core/sweep/__init__.py says what one is): the worker processes that share an Optuna study,
each trial's training, and the record of what the study found. Training never sees the tracker: a trial reports
through a metrics sink to a TrialRuns object that the caller hands in."""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import multiprocessing
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core.sweep.record import SweepError, SweepRecord, TrialRuns
from pipelines.core.sweep.space import spec_settings, suggest, sweep_metric, with_settings

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.records import BaseModelRecord
    from pipelines.core.sections import SpecView
    from pipelines.core.training.compute import ComputeSettings, ProgressFn


# ------------------------------------------------------------------------------------------ a worker
class _TrialSink:
    """Metrics of one trial: to its tracked run, and each epoch's validation metric to Optuna (which may prune the
    trial there)."""

    def __init__(self, trial: Any, runs: TrialRuns | None, run_id: str | None, key: str, prune: bool) -> None:
        self.trial, self.runs, self.run_id, self.key, self.prune = trial, runs, run_id, key, prune
        self.epochs = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import optuna

        if self.runs is not None and self.run_id:
            self.runs.log_metrics(self.run_id, {k: float(v) for k, v in metrics.items()
                                                if isinstance(v, (int, float)) and math.isfinite(v)}, step)
        if self.key in metrics:
            self.epochs += 1
            self.trial.report(float(metrics[self.key]), step=self.epochs)
            if self.prune and self.trial.should_prune():
                raise optuna.TrialPruned(f"epoch {self.epochs}: validation below the median of earlier trials")


def run_worker(job: dict[str, Any]) -> None:
    """One worker process: load the study from its storage and run this worker's share of the trials."""
    import optuna
    import pandas as pd

    from pipelines.core.records import BaseModelRecord
    from pipelines.core.spec import PipelineSpec
    from pipelines.core.tasks import task_for
    from pipelines.core.training.compute import ComputeSettings
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = PipelineSpec.model_validate(job["spec"])
    data = pd.read_parquet(job["data"])
    base = BaseModelRecord.from_dict(job["base"])
    compute = ComputeSettings(**job["compute"])
    task = task_for(spec)
    cfg = spec.sweep
    metric, _ = sweep_metric(spec)
    key = f"eval_{metric}"
    runs: TrialRuns | None = job.get("runs")
    log = Path(job["log"])

    def say(line: str) -> None:
        with log.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def objective(trial: Any) -> float:
        params = {name: suggest(trial, name, parameter) for name, parameter in cfg.space.items()}
        trial_spec = with_settings(spec, params)
        run_id = None
        if runs is not None:
            run_id = runs.start(f"trial {trial.number}", params, {
                "tuneline.kind": "sweep_trial", "tuneline.pipeline": spec.name, "optuna.study": job["study"],
                "optuna.trial": str(trial.number)})
        say(f"trial {trial.number}: started with {params}")
        started = time.monotonic()
        sink = _TrialSink(trial, runs, run_id, key, cfg.prune)
        out = Path(tempfile.mkdtemp(prefix=f"trial-{trial.number}-", dir=job["scratch"]))
        status = "FAILED"
        try:
            record = task.train(data, base, trial_spec, out / "checkpoint", compute, progress=lambda _: None,
                                sink=sink)
            values = [h[key] for h in record.history if key in h]
            if not values:
                raise SweepError(f"training reported no {key} (is there a validation split?)")
            value = max(values) if job["direction"] == "maximize" else min(values)
            trial.set_user_attr("epochs_run", sink.epochs)
            status = "FINISHED"
            say(f"trial {trial.number}: validation {metric} {value:.4f} after {time.monotonic() - started:.0f} s")
            return value
        except optuna.TrialPruned:
            trial.set_user_attr("epochs_run", sink.epochs)
            status = "KILLED"
            say(f"trial {trial.number}: pruned after epoch {sink.epochs}")
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            say(f"trial {trial.number}: failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            trial.set_user_attr("seconds", time.monotonic() - started)
            if runs is not None and run_id:
                runs.end(run_id, status, time.monotonic() - started)
            shutil.rmtree(out, ignore_errors=True)  # a trial's weights are not kept: the best settings train again

    study = optuna.load_study(study_name=job["study"], storage=study_storage(job["storage"]),
                              sampler=optuna.samplers.TPESampler(seed=job["seed"]),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    deadline = time.monotonic() + job["timeout"] if job["timeout"] else math.inf
    for _ in range(job["trials"]):
        if time.monotonic() >= deadline:
            break
        # One worker asks at a time. Asking takes a waiting trial (trial 0, the spec's settings) by reading it and
        # marking it running, and on SQLite, which has no row locks, two workers asking at once both took it.
        with _exclusive(Path(job["scratch"]) / "ask.lock"):
            trial = study.ask()
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except Exception:  # noqa: BLE001 - a failed trial is recorded (its error is a user attribute); others go on
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` among the processes of this machine (the sweep's workers)."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _worker_main(job: dict[str, Any]) -> None:
    try:
        run_worker(job)
    except BaseException:
        Path(job["log"]).open("a", encoding="utf-8").write("worker failed:\n" + traceback.format_exc())
        raise


# ------------------------------------------------------------------------------------------ the sweep
def run_sweep(spec: SpecView, data: pd.DataFrame, base: BaseModelRecord, compute: ComputeSettings, folder: Path,
              storage: str, study: str, runs: TrialRuns | None = None, progress: ProgressFn = print) -> SweepRecord:
    """Run the spec's sweep in `sweep.parallel` worker processes and return what it found. `folder` holds the
    data the workers read and their scratch space; `runs` tracks each trial (an MLflow child run)."""
    import dataclasses

    import optuna

    cfg = spec.sweep
    metric, direction = sweep_metric(spec)
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / "data.parquet"
    data[data["split"] != "test"].to_parquet(data_path)  # what trials may see: the test split never reaches them
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    created = optuna.create_study(study_name=study, storage=study_storage(storage), direction=direction,
                                  load_if_exists=True)
    own = spec_settings(spec)
    if cfg.start_from_spec and own is not None and not created.trials:
        created.enqueue_trial(own)  # trial 0: the settings the spec would train with
        progress(f"trial 0 is the spec's own settings {own}")
    threads = max(1, (compute.num_threads or 1) // cfg.parallel)
    log = folder / "trials.log"
    log.write_text("", encoding="utf-8")
    shares = [cfg.trials // cfg.parallel + (1 if i < cfg.trials % cfg.parallel else 0) for i in range(cfg.parallel)]
    started = time.monotonic()
    goal = "maximising" if direction == "maximize" else "minimising"
    progress(f"{cfg.trials} trials in {cfg.parallel} process(es) of {threads} thread(s), study {study}, "
             f"{goal} validation {metric}")
    context = multiprocessing.get_context("spawn")
    workers = []
    for i, share in enumerate(s for s in shares if s):
        job = {"spec": spec.model_dump(mode="json"), "data": str(data_path), "base": dataclasses.asdict(base),
               "compute": {**dataclasses.asdict(compute), "num_threads": threads}, "storage": storage, "study": study,
               "trials": share, "timeout": cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None,
               "seed": spec.training.seed + i, "direction": direction, "log": str(log), "scratch": str(folder),
               "runs": runs}
        worker = context.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{i}")
        worker.start()
        workers.append(worker)
    seen = 0
    try:
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            seen = _relay(log, seen, progress)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
    _relay(log, seen, progress)
    result = optuna.load_study(study_name=study, storage=study_storage(storage))
    trials = tuple(_trial_row(t) for t in result.trials)
    complete = [t for t in result.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = "; ".join(sorted({str(t.user_attrs.get("error", t.state.name)) for t in result.trials}))
        raise SweepError(f"sweep: none of the {len(result.trials)} trials completed ({errors}); see {log}")
    best = result.best_trial
    importances: dict[str, float] = {}
    if len(complete) >= 2 and len(cfg.space) >= 2:
        try:
            importances = {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(result).items()}
        except Exception:  # importances need varied completed trials; without them the table still stands
            importances = {}
    record = SweepRecord(study=study, storage=_without_password(storage), metric=metric, direction=direction,
                         best_params=dict(best.params), best_value=float(best.value), best_trial=best.number,
                         trials=trials, seconds=time.monotonic() - started, importances=importances)
    plot = folder / "sweep.png"
    _write_plot(record, plot)
    return dataclasses.replace(record, plot=str(plot))


def _relay(log: Path, seen: int, progress: Any) -> int:
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    for line in lines[seen:]:
        progress(line)
    return len(lines)


def study_storage(url: str) -> Any:
    """Optuna's storage for a database URL; SQLite waits for a lock instead of failing at once, since several
    worker processes write to it."""
    import optuna

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def _trial_row(trial: Any) -> dict[str, Any]:
    value = trial.value
    if value is None and trial.intermediate_values:  # a pruned trial: its last epoch's validation metric
        value = trial.intermediate_values[max(trial.intermediate_values)]
    return {"trial": trial.number, "state": trial.state.name.lower(),
            "value": None if value is None else round(float(value), 4),
            "seconds": round(float(trial.user_attrs.get("seconds", 0.0)), 1),
            "epochs_run": int(trial.user_attrs.get("epochs_run", 0)), "params": dict(trial.params),
            "error": trial.user_attrs.get("error")}


def _without_password(url: str) -> str:
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _write_plot(record: SweepRecord, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.core.files import write_bytes_atomic

    panels = 2 if record.importances else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    for state, marker in (("complete", "o"), ("pruned", "x")):
        points = [(t["trial"], t["value"]) for t in record.trials if t["state"] == state and t["value"] is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, label=state)
    best = [t for t in record.trials if t["trial"] == record.best_trial]
    ax.scatter([best[0]["trial"]], [best[0]["value"]], s=120, facecolors="none", edgecolors="red", label="best")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {record.metric}")
    ax.set_title("Validation metric by trial", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if record.importances:
        names = list(record.importances)[::-1]
        axes[0][1].barh(names, [record.importances[n] for n in names])
        axes[0][1].set_title("Parameter importances (fANOVA)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
