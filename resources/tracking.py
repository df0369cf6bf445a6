"""Experiment tracking and the model registry in MLflow: the only module of tuneline that imports mlflow.

One MLflow experiment per pipeline (`tuneline/<pipeline>`); one parent run per Dagster run; one child run per
asset materialization, tagged with the Dagster run id, asset key, pipeline, code version and data version.
Fine-tuned checkpoints become versions of a registered model named after the pipeline; the alias
`champion` marks the version in use.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.errors import StepInterrupted, TunelineError
from pipelines.core.files import process_alive
from pipelines.core.records import CheckpointRecord, EvaluationReport, FilePath, Markdown, StepLog
from pipelines.core.steps import registry_tags
from pipelines.core.serving import registered_record
from pipelines.core.tasks.base import ServingSchema

URI_ENV_VAR = "TUNELINE_TRACKING_URI"
# A team server's credentials (MLflow's basic-auth app): the MLflow client reads these variables itself; tuneline
# checks them once per client and never writes them anywhere.
USER_ENV_VAR, PASSWORD_ENV_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the run artifact folder a registered version is (an MLflow Model)


class TrackingError(TunelineError):
    """The tracking store cannot be used."""


class TrackingUnavailable(TrackingError):
    """The tracking server did not answer (refused, reset, timed out): an outage, worth a retry."""


# Set when a step of this process is interrupted: the run is stopping, so the steps still to start fail at once.
_INTERRUPTED = threading.Event()


def is_outage(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it wraps, says the tracking server could not be reached or did not answer in
    time (MLflow raises its own exception from inside the `requests` error)."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TrackingUnavailable | requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def dagster_value(value: Any) -> Any:
    """A step's metadata value as Dagster shows it: Markdown, paths, JSON for lists and dicts, floats to four
    decimals (four significant digits below 0.001, so a learning rate of 5e-05 stays one), plain scalars."""
    if isinstance(value, Markdown):
        return dg.MetadataValue.md(str(value))
    if isinstance(value, FilePath):
        return dg.MetadataValue.path(str(value))
    if isinstance(value, (list, tuple, dict)):
        return dg.MetadataValue.json(value)
    if isinstance(value, float) and math.isfinite(value):  # MLflow keeps every digit; the UI shows four decimals
        return dg.MetadataValue.float(round(value, 4) if abs(value) >= 1e-3 or value == 0 else float(f"{value:.4g}"))
    return value


@dataclasses.dataclass(frozen=True)
class MlflowChildRuns:
    """Child runs of one MLflow run, opened from any process (it pickles: the client is made where it is used).
    Implements pipelines.core.sweep.record.TrialRuns for a sweep's trials."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        client = self._client()
        run = client.create_run(self.experiment_id, run_name=name,
                                tags={**tags, "mlflow.parentRunId": self.parent_run_id})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        return str(run.info.run_id)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client().log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def end(self, run_id: str, status: str, seconds: float) -> None:
        client = self._client()
        client.log_metric(run_id, "trial_seconds", seconds)
        client.set_terminated(run_id, status)


def _mlflow() -> Any:
    import mlflow

    return mlflow


class AssetRun:
    """The MLflow run of one asset materialization; also a metrics sink for training."""

    def __init__(self, client: Any, run_id: str, url: str, log: Callable[[str], None] = print) -> None:
        self.client, self.run_id, self.url, self.log = client, run_id, url, log

    def record(self, step: StepLog) -> dict[str, Any]:
        """Record a step's log in MLflow (params, metrics, datasets, texts, artifacts, tags) and return it as
        Dagster metadata, with the MLflow run it went to."""
        self.log_params(step.params)
        self.log_metrics(step.metrics, 0)
        for dataset in step.datasets:
            self.log_dataset(dataset.frame, dataset.name, dataset.digest, dataset.context, dataset.source)
        for text, artifact_file in step.texts:
            self.log_text(text, artifact_file)
        for path, folder in step.artifacts:
            self.log_artifact(path, folder)
        self.set_tags({**step.tags, **({"dagster.data_version": step.data_version} if step.data_version else {})})
        if step.message:
            self.log(step.message)
        return {**{k: dagster_value(v) for k, v in step.metadata.items()},
                "mlflow_run_id": self.run_id, "mlflow_run": dg.MetadataValue.url(self.url)}

    def output(self, value: Any, step: StepLog) -> dg.Output[Any]:
        """The asset's output: its value, the step's metadata and its content-digest data version."""
        return dg.Output(value, metadata=self.record(step), data_version=dg.DataVersion(step.data_version))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("/", "_"), float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dataset(self, frame: pd.DataFrame, name: str, digest: str, context: str, source: str) -> None:
        """Record a table as an MLflow dataset input with its digest (the table itself is not copied)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # schema inference hints about integer columns
            dataset = _mlflow().data.from_pandas(frame, name=name, digest=digest[:36],
                                                 source=CodeDatasetSource(tags={"tuneline.source": source}))
        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


class TrackingResource(dg.ConfigurableResource):
    """MLflow tracking: the embedded SQLite store under data_dir, or the URI in $TUNELINE_TRACKING_URI."""

    data_dir: str
    uri_env_var: str = URI_ENV_VAR

    # ------------------------------------------------------------------------------------ connection
    @property
    def embedded_uri(self) -> str:
        return f"sqlite:///{(Path(self.data_dir) / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (Path(self.data_dir) / "mlflow" / "artifacts").resolve()

    def child_runs_of(self, run: AssetRun) -> MlflowChildRuns:
        """MLflow child runs under `run`, which another process can open (a sweep's trials)."""
        return MlflowChildRuns(self.tracking_uri(), run.client.get_run(run.run_id).info.experiment_id, run.run_id)

    def tracking_uri(self) -> str:
        # Read when the resource is used, never at import: dg.EnvVar resolves the variable now.
        return dg.EnvVar(self.uri_env_var).get_value() or self.embedded_uri

    def client(self) -> Any:
        """A client for the tracking store, after checking that the store answers."""
        uri = self.tracking_uri()
        if uri.startswith("sqlite:///"):
            return self._embedded_client(uri)
        if uri.startswith(("http://", "https://")):
            # MLflow retries a failed request 7 times with backoff factor 2 (about 4 minutes) before a registry
            # outage surfaces; bound it unless the user chose otherwise. Process-wide, read on every request.
            for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                                ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
                os.environ.setdefault(name, value)
            from urllib.parse import urlsplit

            if urlsplit(uri).password is not None or urlsplit(uri).username is not None:
                raise TrackingError(f"${self.uri_env_var} holds credentials; URIs end up in logs and run metadata. "
                                    f"Give the server's address alone and the credentials in ${USER_ENV_VAR} and "
                                    f"${PASSWORD_ENV_VAR}")
            try:  # MLflow's own client retries for minutes; a tracking server answers /health at once
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
                    response.read()
            except urllib.error.HTTPError:
                pass  # it answers (a proxy in front may protect /health too); credentials are checked next
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise TrackingUnavailable(f"the MLflow tracking server at {uri} (from ${self.uri_env_var}) does not "
                                    f"answer: {exc}. Start it, fix the URI, or unset ${self.uri_env_var} to use "
                                    f"the embedded store in {Path(self.data_dir) / 'mlflow'}") from None
            self._check_credentials(uri)
        else:
            raise TrackingError(f"unsupported MLflow tracking URI {uri!r} (from ${self.uri_env_var}): expected "
                                "http(s)://host:port or sqlite:///absolute/path.db")
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _check_credentials(self, uri: str) -> None:
        """A server behind MLflow's basic-auth app answers 401 without (or with wrong) credentials: say which
        variables to set, naming the user but never the password. The MLflow client reads the same variables."""
        import base64

        user = dg.EnvVar(USER_ENV_VAR).get_value()
        password = dg.EnvVar(PASSWORD_ENV_VAR).get_value()
        bearer = dg.EnvVar("MLFLOW_TRACKING_TOKEN").get_value()
        request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
        if bearer:  # the MLflow client sends the token instead of basic credentials when both are set
            request.add_header("Authorization", f"Bearer {bearer}")
        elif user is not None and password is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                given = ("refused the token in $MLFLOW_TRACKING_TOKEN" if bearer else
                         f"refused the credentials of user {user!r} (${USER_ENV_VAR} / ${PASSWORD_ENV_VAR})"
                         if user is not None and password is not None else
                         f"requires credentials: set ${USER_ENV_VAR} and ${PASSWORD_ENV_VAR}")
                raise TrackingError(f"the MLflow tracking server at {uri} {given} (HTTP 401)") from None
            if exc.code == 403:  # a permission, or the server's allowed-hosts list: its own words say which
                said = exc.read(500).decode("utf-8", "replace").strip().splitlines()
                raise TrackingError(f"the MLflow tracking server at {uri} refused the request (HTTP 403): "
                                    f"{said[0] if said else exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError):
            pass  # answered /health a moment ago; MLflow's own client reports what goes wrong next

    def _embedded_client(self, uri: str) -> Any:
        """A client of the SQLite store; the first one creates the database under a file lock, because steps
        running in parallel processes would otherwise race through MLflow's schema migrations."""
        from mlflow import MlflowClient

        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        with (database.parent / ".init.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # creates and migrates the schema if needed
            client.search_registered_models(max_results=1)
        return client

    def experiment_id(self, client: Any, pipeline: str) -> str:
        name = f"tuneline/{pipeline}"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        location = self.artifact_root.as_uri() if self.tracking_uri() == self.embedded_uri else None
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except Exception:  # created meanwhile by a step in another process
            return str(client.get_experiment_by_name(name).experiment_id)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        uri = self.tracking_uri()
        base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"

    # -------------------------------------------------------------------------------------- runs
    def _parent_run(self, client: Any, experiment_id: str, dagster_run_id: str, pipeline: str) -> str:
        """The one parent run of a Dagster run; steps in other processes find it through a lock and a tag."""
        lock_dir = Path(self.data_dir) / "mlflow" / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with (lock_dir / f"{dagster_run_id}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = client.search_runs([experiment_id], filter_string=(
                f"tags.`dagster.run_id` = '{dagster_run_id}' and tags.`tuneline.kind` = 'dagster_run'"))
            if found:
                return str(found[0].info.run_id)
            run = client.create_run(experiment_id, run_name=f"dagster run {dagster_run_id[:8]}", tags={
                "dagster.run_id": dagster_run_id, "tuneline.pipeline": pipeline, "tuneline.kind": "dagster_run"})
            # The parent groups the asset runs; it is FINISHED unless one of them fails.
            client.set_terminated(run.info.run_id, "FINISHED")
            return str(run.info.run_id)

    @staticmethod
    def _close_abandoned_runs(client: Any, experiment_id: str, warn: Callable[[str], None]) -> None:
        """Runs left RUNNING by a process of this machine that is gone (killed, crashed, machine restarted) are
        marked KILLED, with a tag that says so: nothing stays RUNNING forever."""
        host = socket.gethostname()
        for found in client.search_runs([experiment_id], filter_string=(
                f"attributes.status = 'RUNNING' and tags.`tuneline.host` = '{host}'"), max_results=1000):
            pid = int(found.data.tags.get("tuneline.pid", "0") or 0)
            if pid and process_alive(pid):
                continue
            client.set_tag(found.info.run_id, "tuneline.error",
                           f"the process that ran it (pid {pid} on {host}) ended without closing it: killed or "
                           "crashed; closed by the next materialization")
            client.set_terminated(found.info.run_id, "KILLED")
            warn(f"MLflow run {found.info.run_id} ({found.info.run_name}) was left RUNNING by process {pid}, which "
                 "is gone: marked KILLED")

    @contextmanager
    def _only_outages_retried(self) -> Iterator[None]:
        """A tracking-server outage fails the step as TrackingUnavailable, which the assets' RetryPolicy retries;
        any other error (bad data, a bad spec, a full disk, a bug) fails it for good, without retries.

        So does an interrupt (SIGINT, SIGTERM: Ctrl-C, `kill`, a stopped container). Dagster retries an interrupted
        step under a RetryPolicy, so `tuneline run` went on after `kill` (the step started again, twice); now the
        step fails at once, and the steps of the same process that were still to start fail without running."""
        if _INTERRUPTED.is_set():
            why = "not started: this run was interrupted (SIGINT or SIGTERM) in an earlier step"
            raise dg.Failure(description=why, allow_retries=False) from StepInterrupted(why)
        try:
            yield
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
            _INTERRUPTED.set()
            why = ("interrupted (SIGINT or SIGTERM): the step stopped before writing its output; materialize again to "
                   "go on (an interrupted training resumes from its last checkpoint)")
            raise dg.Failure(description=why, allow_retries=False) from StepInterrupted(why)
        except (dg.Failure, dg.RetryRequested):
            raise
        except Exception as exc:
            if isinstance(exc, TrackingUnavailable):
                raise
            if is_outage(exc):
                raise TrackingUnavailable(
                    f"the MLflow tracking server at {self.tracking_uri()} stopped answering: "
                    f"{str(exc).splitlines()[0][:300]}. The step is retried; once the server is back, materialize "
                    "again (training resumes from its last checkpoint)") from exc
            raise dg.Failure(description=str(exc), allow_retries=False) from exc

    @contextmanager
    def asset_run(self, context: dg.AssetExecutionContext, pipeline: str) -> Iterator[AssetRun]:
        """An MLflow run for this materialization: FINISHED when the body returns, FAILED when it raises (or left
        to the next materialization to close, when the server is gone)."""
        with self._only_outages_retried():
            with self._tracked(context, pipeline) as tracked:
                yield tracked

    @contextmanager
    def _tracked(self, context: dg.AssetExecutionContext, pipeline: str) -> Iterator[AssetRun]:
        client = self.client()
        experiment_id = self.experiment_id(client, pipeline)
        self._close_abandoned_runs(client, experiment_id, context.log.warning)
        parent = self._parent_run(client, experiment_id, context.run_id, pipeline)
        key = context.asset_key
        run = client.create_run(experiment_id, run_name=key.path[-1], tags={
            "tuneline.host": socket.gethostname(),
            "tuneline.pid": str(os.getpid()),
            "mlflow.parentRunId": parent,
            "dagster.run_id": context.run_id,
            "dagster.asset_key": key.to_user_string(),
            "dagster.code_version": context.assets_def.code_versions_by_key.get(key) or "",
            "tuneline.pipeline": pipeline,
            "tuneline.kind": "asset",
        })
        tracked = AssetRun(client, run.info.run_id, self.run_url(experiment_id, run.info.run_id), context.log.info)
        try:
            yield tracked
        except BaseException as exc:
            if not is_outage(exc):  # a server that is gone cannot be told; the next materialization closes the run
                client.set_tag(run.info.run_id, "tuneline.error", f"{type(exc).__name__}: {exc}"[:5000])
                client.set_terminated(run.info.run_id, "FAILED")
                client.set_terminated(parent, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")

    # ---------------------------------------------------------------------------------- registry
    @staticmethod
    def _is_missing(exc: BaseException) -> bool:
        """Whether MLflow answered that a registered model, a version of it or an alias on it does not exist.

        The SQLite store raises MlflowException, a tracking server RestException (a subclass), with the
        same codes: RESOURCE_DOES_NOT_EXIST for a missing model or version, INVALID_PARAMETER_VALUE with
        "Registered model alias <alias> not found." for a missing alias. Anything else (server unreachable,
        5xx, permissions, timeouts) means the registry could not be asked, which is not an answer.
        """
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            return False
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return True
        return (exc.error_code == "INVALID_PARAMETER_VALUE" and "Registered model alias" in exc.message
                and "not found" in exc.message)

    def register(self, run: AssetRun, pipeline: str, artifact_path: str, tags: Mapping[str, str]) -> str:
        """A new version of the registered model `pipeline` from the run's artifact folder; returns it."""
        client = run.client
        try:
            client.get_registered_model(pipeline)
        except Exception as exc:
            if not self._is_missing(exc):
                raise TrackingError(f"the model registry at {self.tracking_uri()} cannot be asked for the "
                                    f"registered model {pipeline!r}: {exc}") from exc
            client.create_registered_model(pipeline, description=f"Fine-tuned models of the {pipeline} pipeline.")
        source = client.get_run(run.run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
        version = client.create_model_version(pipeline, source=source, run_id=run.run_id, tags=dict(tags),
                                              run_link=run.url)
        return str(version.version)

    def champion(self, pipeline: str) -> tuple[str, Path] | None:
        """The version under the alias `champion` and a local copy of its files; None only when the registry
        answers that the pipeline has no registered model or that the model has no `champion` alias."""
        version = self._champion_version(self.client(), pipeline)
        return None if version is None else self._download(pipeline, version)

    def champion_entry(self, pipeline: str) -> dict[str, Any] | None:
        """The champion's registry entry as registered_versions lists it (number, MLflow run, tags), or None."""
        number = self.champion_version(pipeline)
        return next((v for v in self.registered_versions(pipeline) if v["version"] == number), None) \
            if number is not None else None

    def champion_version(self, pipeline: str) -> str | None:
        """The number of the version under the alias `champion`, or None (nothing is downloaded)."""
        version = self._champion_version(self.client(), pipeline)
        return None if version is None else str(version.version)

    def _champion_version(self, client: Any, pipeline: str) -> Any:
        """The MLflow ModelVersion under the alias `champion`, or None; TrackingError when the registry
        cannot be asked (a registry outage must never look like a first model)."""
        try:
            return client.get_model_version_by_alias(pipeline, CHAMPION)
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise TrackingError(f"the model registry at {self.tracking_uri()} cannot be asked for the "
                                f"{CHAMPION} of {pipeline!r}: {exc}") from exc

    def model_version(self, pipeline: str, number: str) -> tuple[str, Path]:
        """A registered version of the pipeline's model and a local copy of its files."""
        client = self.client()
        return self._download(pipeline, self._version(client, pipeline, number))

    def _version(self, client: Any, pipeline: str, number: str) -> Any:
        """The MLflow ModelVersion `number` of the pipeline's model; a TrackingError naming it when there is none."""
        try:
            return client.get_model_version(pipeline, str(number))
        except Exception as exc:
            if self._is_missing(exc):
                raise TrackingError(f"the model registry at {self.tracking_uri()} has no version {number} of "
                                    f"{pipeline!r}") from None
            raise TrackingError(f"the model registry at {self.tracking_uri()} cannot be asked for version "
                                f"{number} of {pipeline!r}: {exc}") from exc

    def _download(self, pipeline: str, version: Any) -> tuple[str, Path]:
        target = Path(tempfile.mkdtemp(prefix=f"tuneline-{pipeline}-v{version.version}-"))
        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)  # a bar per download of a few small files is noise
        local = _mlflow().artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target),
                                                       tracking_uri=self.tracking_uri())
        return str(version.version), Path(local)

    def served_version(self, pipeline: str, number: str | None) -> tuple[str, str]:
        """The version `mlflow models serve` should load (`number`, else the champion) and its models:/ URI; a
        TrackingError that says what to do when there is none, or when it is a plain checkpoint folder registered
        before versions were MLflow Models (`tuneline predict` still answers with those)."""
        client = self.client()
        version = None
        if number is None:
            version = self._champion_version(client, pipeline)
            if version is None:
                registered = [v["version"] for v in self.registered_versions(pipeline)]
                raise TrackingError(
                    f"pipeline {pipeline!r} has no {CHAMPION} in the model registry at {self.tracking_uri()}"
                    + (f" (registered: {', '.join(registered)}; pass --version {registered[-1]} to serve the newest "
                       "anyway)" if registered else f"; run `tuneline run --pipeline {pipeline}` first"))
        else:
            version = self._version(client, pipeline, number)
        if not str(version.source).rstrip("/").endswith("/" + MODEL_ARTIFACT):
            raise TrackingError(f"v{version.version} of {pipeline!r} was registered as a plain checkpoint folder, "
                                "before registered versions were MLflow Models: `tuneline predict --version "
                                f"{version.version}` answers with it; materialize the pipeline again to register a "
                                "version MLflow can serve")
        return str(version.version), f"models:/{pipeline}/{version.version}"

    def registered_versions(self, pipeline: str) -> list[dict[str, Any]]:
        """Every registered version of the pipeline's model as recorded: number, aliases, MLflow run, tags."""
        client = self.client()
        try:
            model = client.get_registered_model(pipeline)
        except Exception as exc:
            if self._is_missing(exc):
                return []
            raise TrackingError(f"the model registry at {self.tracking_uri()} cannot be asked for the "
                                f"registered model {pipeline!r}: {exc}") from exc
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        versions = client.search_model_versions(f"name = '{pipeline}'")
        return sorted(({"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                        "mlflow_run_id": v.run_id, "source": v.source, "tags": dict(v.tags or {}),
                        "mlflow_run_url": self.run_url(client.get_run(v.run_id).info.experiment_id, v.run_id)}
                       for v in versions), key=lambda v: int(v["version"]))

    def promote(self, pipeline: str, version: str, reason: str) -> None:
        client = self.client()
        client.set_registered_model_alias(pipeline, CHAMPION, version)
        client.set_model_version_tag(pipeline, version, "tuneline.promotion", reason)

    # ------------------------------------------------------------------------- the pipeline's registry steps
    def register_checkpoint(self, run: AssetRun, pipeline: str, record: CheckpointRecord, dagster_run_id: str,
                            serving: ServingSchema, examples: Sequence[str]) -> CheckpointRecord:
        """Register the checkpoint as an MLflow Model (the run's `model` artifacts: the checkpoint, a copy of its base
        model and the code that answers with it, resources/mlflow_model.py); the record gains its version."""
        from resources.mlflow_model import save_mlflow_model

        with tempfile.TemporaryDirectory(prefix="tuneline-model-") as scratch:
            run.log_artifact(save_mlflow_model(record, serving, examples, Path(scratch) / MODEL_ARTIFACT),
                             MODEL_ARTIFACT)
        version = self.register(run, pipeline, MODEL_ARTIFACT, registry_tags(record, dagster_run_id))
        return dataclasses.replace(record, model_version=version)

    def champion_checkpoint(self, pipeline: str) -> CheckpointRecord | None:
        """The champion's checkpoint, downloaded and verified, or None when the pipeline has none yet."""
        found = self.champion(pipeline)
        return registered_record(found[1], model_version=found[0]) if found else None

    @contextmanager
    def promotion_lock(self, pipeline: str) -> Iterator[None]:
        """Held from reading the champion to moving the alias, so that two runs of a pipeline on this machine
        decide one after the other (the second against the champion the first may have set)."""
        lock_dir = Path(self.data_dir) / "mlflow" / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with (lock_dir / f"{pipeline}.promotion.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def apply_promotion(self, pipeline: str, report: EvaluationReport, checkpoint: CheckpointRecord,
                        evaluated_against: CheckpointRecord | None) -> EvaluationReport:
        """Move the champion alias to the checkpoint when the report says it should, and only if the champion is
        still the one the report compared with (compare-and-set: another machine may have moved it meanwhile);
        otherwise the report says it was not promoted, and why. Returns the report as applied."""
        if not (report.promotion.promote and checkpoint.model_version):
            return report
        current = self._champion_version(self.client(), pipeline)
        now = None if current is None else str(current.version)
        expected = evaluated_against.model_version if evaluated_against else None
        if now != expected:
            reason = (f"not promoted: the champion moved to v{now} while this run compared itself with "
                      f"{'v' + str(expected) if expected else 'no champion'}; materialize evaluation_report again "
                      "to compare with the new one")
            return dataclasses.replace(report, promotion=dataclasses.replace(report.promotion, promote=False,
                                                                             reason=reason))
        self.promote(pipeline, checkpoint.model_version, report.promotion.reason)
        return report
