"""deploy/: the files a team runs tuneline with (docker compose here; see the README). Docker cannot run in the
test environment, so each file is checked as far as a real part can: the instance config by Dagster against a real
PostgreSQL, the workspace by Dagster's schema, the compose file's wiring of secrets, services and paths."""

from __future__ import annotations

import configparser
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.conftest import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"


@pytest.mark.server
def test_the_deploy_instance_runs_on_postgres_and_tuneline_leaves_it_alone(
        postgres: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import ensure_dagster_home

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("TUNELINE_DAGSTER_POSTGRES_URL", postgres.create_database("deploy"))  # type: ignore[attr-defined]
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    ensure_dagster_home()
    assert (home / "dagster.yaml").read_text() == (DEPLOY / "dagster.yaml").read_text(), "not tuneline's to rewrite"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1 and config.run_queue_config.max_concurrent_runs == 2
        assert instance.get_runs() == []


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_the_workspace_is_valid_and_points_at_the_code_service() -> None:
    from dagster._core.workspace.config_schema import ensure_workspace_config

    workspace = ensure_workspace_config(yaml.safe_load((DEPLOY / "workspace.yaml").read_text()), "workspace.yaml")
    [entry] = workspace["load_from"]
    grpc = entry["grpc_server"]
    services = _compose()["services"]
    code = services["code"]["command"]
    assert grpc["host"] == "code" and f"-p {grpc['port']}" in code and f"--location-name {grpc['location_name']}" in code
    assert "-m pipelines.definitions" in code
    for name in ("webserver", "daemon"):
        assert "-w deploy/workspace.yaml" in services[name]["command"]


def test_every_secret_comes_from_the_env_file_and_every_service_shares_one_instance() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    documented = {line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))  # $${...} is the container's shell
    assert referenced and referenced <= documented, referenced - documented
    services = _compose()["services"]
    assert set(services) >= {"postgres", "s3", "s3-bucket", "mlflow", "code", "webserver", "daemon"}
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|_KEY$", key) or "@postgres:" in str(value):
                assert "${" in str(value), f"{name}.{key} holds a literal secret"
    urls = {services[n]["environment"]["TUNELINE_DAGSTER_POSTGRES_URL"] for n in ("code", "webserver", "daemon")}
    assert len(urls) == 1 and next(iter(urls)).startswith("postgresql+psycopg2://")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    home = services["webserver"]["environment"]["DAGSTER_HOME"]
    assert f"ENV DAGSTER_HOME={home}" in dockerfile and f"COPY deploy/dagster.yaml {home}/dagster.yaml" in dockerfile
    assert "COPY deploy/workspace.yaml" in dockerfile and "torch==2.13.0" in dockerfile
    assert ".env" in (PROJECT_ROOT / ".gitignore").read_text()


def test_the_mlflow_auth_template_has_what_the_basic_auth_app_reads() -> None:
    template = (DEPLOY / "mlflow-auth.ini").read_text()
    filled = template.replace("@DATABASE_URI@", "postgresql+psycopg2://u:p@h/db").replace("@ADMIN_PASSWORD@", "x" * 16)
    parser = configparser.ConfigParser()
    parser.read_string(filled)
    assert {"default_permission", "database_uri", "admin_username", "admin_password",
            "authorization_function"} <= set(parser["mlflow"])
    command = _compose()["services"]["mlflow"]["command"]
    assert "@DATABASE_URI@" in command and "@ADMIN_PASSWORD@" in command and "--app-name basic-auth" in command
