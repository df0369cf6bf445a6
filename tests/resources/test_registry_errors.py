"""The model registry answers "no champion" only when it says so: a store it cannot ask is an error, never a
first model.

Real stores only: the embedded SQLite store and a real `mlflow server` over HTTP.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from resources.tracking import CHAMPION, URI_ENV_VAR, AssetRun, TrackingError, TrackingResource
from tests.servers import free_port, start, stop, wait_until_up


def _model_run(tracking: TrackingResource, client: MlflowClient, pipeline: str) -> AssetRun:
    """A finished MLflow run with a small "checkpoint" folder among its artifacts, as training leaves one."""
    experiment_id = tracking.experiment_id(client, pipeline)
    run = client.create_run(experiment_id, run_name="train")
    client.log_text(run.info.run_id, "weights", "checkpoint/weights.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return AssetRun(client, run.info.run_id, tracking.run_url(experiment_id, run.info.run_id))


def test_sqlite_store_no_model_and_no_alias_mean_no_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URI_ENV_VAR, raising=False)
    tracking = TrackingResource(data_dir=str(tmp_path / "data"))
    assert tracking.tracking_uri().startswith("sqlite:///")
    client = tracking.client()

    assert tracking.champion("tiny") is None  # no registered model at all
    assert tracking.registered_versions("tiny") == []
    with pytest.raises(TrackingError, match=r"has no version 1 of 'tiny'"):
        tracking.model_version("tiny", "1")

    assert tracking.register(_model_run(tracking, client, "tiny"), "tiny", "checkpoint", {"k": "v"}) == "1"
    assert tracking.champion("tiny") is None  # a version, but no alias yet
    assert [v["version"] for v in tracking.registered_versions("tiny")] == ["1"]
    with pytest.raises(TrackingError, match=r"has no version 2 of 'tiny'"):
        tracking.model_version("tiny", "2")
    # a second registration finds the existing registered model instead of creating it again
    assert tracking.register(_model_run(tracking, client, "tiny"), "tiny", "checkpoint", {}) == "2"

    client.set_registered_model_alias("tiny", CHAMPION, "1")
    found = tracking.champion("tiny")
    assert found is not None
    version, local = found
    assert version == "1"
    assert (local / "weights.txt").read_text() == "weights"
    assert tracking.registered_versions("tiny")[0]["aliases"] == [CHAMPION]


@pytest.mark.server
def test_http_server_registry_outage_raises_instead_of_no_champion(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow retries a refused connection 7 times with backoff factor 2 (about 4 minutes) by default.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = start([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination", str(tmp_path / "server-artifacts")], log)
    try:
        wait_until_up(f"{uri}/health", server, log)
        monkeypatch.setenv(URI_ENV_VAR, uri)
        tracking = TrackingResource(data_dir=str(tmp_path / "data"))
        assert tracking.tracking_uri() == uri

        # the server's answers for "missing" are "no champion" too
        assert tracking.champion("tiny") is None
        assert tracking.registered_versions("tiny") == []
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = _model_run(tracking, client, "tiny")
        assert tracking.register(run, "tiny", "checkpoint", {}) == "1"
        assert tracking.champion("tiny") is None
        client.set_registered_model_alias("tiny", CHAMPION, "1")
        found = tracking.champion("tiny")
        assert found is not None and found[0] == "1"
        assert (found[1] / "weights.txt").read_text() == "weights"

        connected = tracking.client()  # created while the server answers
    finally:
        stop(server)
    assert server.returncode is not None

    # the server died after the client was created: the MLflow call itself fails
    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        tracking._champion_version(connected, "tiny")
    assert time.monotonic() - started < 30
    assert uri in str(error.value) and "cannot be asked" in str(error.value)
    with pytest.raises(TrackingError, match="cannot be asked for the registered model 'tiny'"):
        tracking.register(AssetRun(connected, run.run_id, run.url), "tiny", "checkpoint", {})

    # the server is down before the lookup: client() notices, champion() raises rather than returning None
    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        tracking.champion("tiny")
    assert time.monotonic() - started < 30
    assert uri in str(error.value)
    for call in (lambda: tracking.registered_versions("tiny"), lambda: tracking.model_version("tiny", "1")):
        with pytest.raises(TrackingError, match=uri):
            call()
