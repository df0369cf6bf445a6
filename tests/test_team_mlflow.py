"""MLflow for a team, for real: a tracking server on PostgreSQL with its artifacts in an S3-compatible store,
served through the server (clients hold no storage credentials), behind MLflow's basic-auth app. tuneline reads
the credentials from the environment; a request without them is refused, and no secret lands in a log line, the
Dagster event log or the MLflow runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.servers import PostgresServer, free_port, start, stop, wait_until_up

pytestmark = pytest.mark.server
ADMIN, PASSWORD = "admin", "team-secret-7f3a9c2e41"
BUCKET = "tuneline-artifacts"
STORAGE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "storage-secret-55d1",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def team_server(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("team")
    bin_dir = Path(sys.executable).parent
    s3_port = free_port()
    s3_log = folder / "s3.log"
    s3 = start([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], s3_log)
    server = None
    try:
        wait_until_up(f"http://127.0.0.1:{s3_port}/", s3, s3_log, any_answer=True)
        import boto3

        endpoint = f"http://127.0.0.1:{s3_port}"
        boto3.client("s3", endpoint_url=endpoint, **_boto(STORAGE_ENV)).create_bucket(Bucket=BUCKET)
        (folder / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {postgres.create_database('mlflow_auth')}\n"
            f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        port = free_port()
        log = folder / "mlflow.log"
        env = {**os.environ, **STORAGE_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint,
               "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-9b1e"}
        server = start([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                        "--workers", "1", "--app-name", "basic-auth",
                        "--backend-store-uri", postgres.create_database("mlflow"),
                        "--artifacts-destination", f"s3://{BUCKET}/mlflow"], log, env=env)
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log, any_answer=True)
        yield {"uri": f"http://127.0.0.1:{port}", "s3": endpoint, "log": log}
    finally:
        if server is not None:
            stop(server)
        stop(s3)


def _boto(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


def _client_env(home: Path, uri: str, **extra: str) -> dict[str, str]:
    """A team member's environment: the server's URI and their MLflow credentials, no storage credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_S3", "MLFLOW_TRACKING_", "TUNELINE_DAGSTER_POSTGRES"))}
    return {**env, "DAGSTER_HOME": str(home), "TUNELINE_TRACKING_URI": uri, **extra}


def test_without_credentials_the_team_server_refuses(team_server: dict[str, Any], tmp_path: Path) -> None:
    request = urllib.request.Request(team_server["uri"] + "/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "hello"],
                         cwd=PROJECT_ROOT, env=_client_env(tmp_path / "home", team_server["uri"]),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "requires credentials: set $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD" in out.stderr

    wrong = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "hello"],
                           cwd=PROJECT_ROOT, env=_client_env(tmp_path / "home", team_server["uri"],
                                                             MLFLOW_TRACKING_USERNAME=ADMIN,
                                                             MLFLOW_TRACKING_PASSWORD="not-" + PASSWORD),
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "refused the credentials of user 'admin'" in wrong.stderr, wrong.stderr[-2000:]
    assert PASSWORD not in wrong.stderr + wrong.stdout

    with_userinfo = team_server["uri"].replace("http://", f"http://{ADMIN}:{PASSWORD}@")
    leaky = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "hello"],
                           cwd=PROJECT_ROOT, env=_client_env(tmp_path / "home", with_userinfo),
                           capture_output=True, text=True, timeout=300)
    assert leaky.returncode != 0 and "holds credentials" in leaky.stderr and PASSWORD not in leaky.stderr


def test_a_team_trains_registers_promotes_and_predicts_through_the_server(
        team_server: dict[str, Any], tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
        write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    home, data = tmp_path / "home", tmp_path / "data"
    env = _client_env(home, team_server["uri"], MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=PASSWORD)

    def tuneline(*args: str) -> subprocess.CompletedProcess[str]:
        where = ["--specs-dir", str(specs)] if args[0] == "run" else []
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args, *where, "--data-dir", str(data)],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert PASSWORD not in done.stdout + done.stderr
        return done

    run = json.loads(tuneline("run", "--pipeline", "tiny", "--json").stdout)
    embedded = [p.name for p in (data / "mlflow").iterdir()] if (data / "mlflow").exists() else []
    assert embedded in ([], ["locks"]), f"nothing but lock files in the embedded store's folder: {embedded}"

    # A team member moves the champion alias, then anyone with credentials predicts with it.
    for key, value in env.items():
        if key.startswith(("MLFLOW_TRACKING_", "TUNELINE_TRACKING")):
            monkeypatch.setenv(key, value)
    from resources.tracking import TrackingResource

    tracking = TrackingResource(data_dir=str(data))
    client = tracking.client()
    [version] = client.search_model_versions("name='tiny'")
    tracking.promote("tiny", version.version, "chosen by the team")
    assert str(client.get_registered_model("tiny").aliases["champion"]) == version.version
    [prediction] = json.loads(tuneline("predict", "--pipeline", "tiny", "--json", "Where is Paris ?").stdout)
    assert prediction["model"] == f"tiny v{version.version}" and 0 < prediction["probability"] <= 1

    # The artifacts went through the server into the bucket (the client had no storage credentials).
    import boto3

    s3 = boto3.client("s3", endpoint_url=team_server["s3"], **_boto(STORAGE_ENV))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith("head.safetensors") for k in keys) and any(k.endswith("report.html") for k in keys)

    # No secret in the MLflow runs' params and tags, nor in the Dagster run's events.
    experiment = client.get_experiment_by_name("tuneline/tiny")
    for mlflow_run in client.search_runs([experiment.experiment_id], max_results=100):
        recorded = json.dumps([mlflow_run.data.params, mlflow_run.data.tags])
        assert PASSWORD not in recorded and STORAGE_ENV["AWS_SECRET_ACCESS_KEY"] not in recorded
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.all_logs(run["run_id"])
        assert records and not any(PASSWORD in dg.serialize_value(r) for r in records)
