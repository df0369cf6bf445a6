"""The Dagster UI of a real `dagster dev`: check results on the asset page, read through its GraphQL API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.servers import free_port, start, stop, wait_until_up

BAD = PROJECT_ROOT / "tests" / "fixtures" / "bad_inputs"
# dagster dev started from a script inherits SIGINT=ignored; reset both signals before exec so that
# SIGTERM stops it and its children.
LAUNCHER = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "signal.signal(signal.SIGTERM, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])")

CHECKS_QUERY = """
query Checks($path: [String!]!) {
  assetNodes(assetKeys: [{path: $path}]) {
    assetChecksOrError {
      ... on AssetChecks { checks { name blocking
        executionForLatestMaterialization { runId status evaluation { severity success description
          metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }
    }
  }
}"""
MATERIALIZATIONS_QUERY = """
query Materializations($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) { ... on Asset { assetMaterializations(limit: 5) { runId } } }
}"""


def graphql(port: int, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


def write_workspace(folder: Path, specs: Path, data: Path) -> Path:
    """A workspace.yaml whose code location builds the definitions of `specs`, writing under `data`."""
    module = folder / "ui_definitions.py"
    module.write_text("from pathlib import Path\n"
                      "from pipelines.definitions import build_definitions\n"
                      f"defs = build_definitions(specs_dir=Path({str(specs)!r}), data_dir=Path({str(data)!r}))\n")
    workspace = folder / "workspace.yaml"
    workspace.write_text(f"load_from:\n  - python_file:\n      relative_path: {module}\n"
                         f"      working_directory: {PROJECT_ROOT}\n      location_name: ui_test\n")
    return workspace


@contextmanager
def running_dagster_dev(workspace: Path, home: Path, log: Path) -> Iterator[int]:
    """`dagster dev` on a free port of 127.0.0.1; stops its whole process group on exit."""
    port = free_port()
    dagster = Path(sys.executable).with_name("dagster")
    process = start([sys.executable, "-c", LAUNCHER, str(dagster), "dev", "-w", str(workspace),
                     "-h", "127.0.0.1", "-p", str(port)], log, env={**os.environ, "DAGSTER_HOME": str(home)},
                    cwd=PROJECT_ROOT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/server_info", process, log)
        yield port
    finally:
        stop(process)


@pytest.fixture
def blocked_run(tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> dict[str, Path]:
    """A DAGSTER_HOME holding one run of the 'gate' pipeline on a label typo, and a workspace that shows it."""
    spec = tiny_spec(BAD / "label_typo.csv", tiny_model_dir)
    spec["task"] = {**spec["task"], "text_column": "text", "label_column": "label",
                    "labels": ["DESC", "HUM", "LOC", "NUM"]}
    specs = write_spec("gate", spec)
    home, data = tmp_path / "home", tmp_path / "data"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--pipeline", "gate", "--specs-dir",
                          str(specs), "--data-dir", str(data)], cwd=PROJECT_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert ("error: check gate/cleaned_dataset:labels_are_known failed (ERROR): labels_are_known failed: "
            "expect_column_values_to_be_in_set(") in run.stderr
    workspace = write_workspace(tmp_path, specs, data)
    return {"home": home, "workspace": workspace}


@pytest.fixture
def dagster_dev(blocked_run: dict[str, Path], tmp_path: Path) -> Iterator[int]:
    with running_dagster_dev(blocked_run["workspace"], blocked_run["home"], tmp_path / "dagster_dev.log") as port:
        yield port


@pytest.mark.server
def test_ui_shows_failed_blocking_check_and_no_checkpoint(dagster_dev: int) -> None:
    port = dagster_dev
    data = graphql(port, CHECKS_QUERY, {"path": ["gate", "cleaned_dataset"]})
    checks = {c["name"]: c for c in data["assetNodes"][0]["assetChecksOrError"]["checks"]}
    assert len(checks) == 11 and all(c["blocking"] for c in checks.values())
    typo = checks["labels_are_known"]["executionForLatestMaterialization"]
    assert typo["status"] == "FAILED"
    assert typo["evaluation"]["severity"] == "ERROR" and typo["evaluation"]["success"] is False
    assert typo["evaluation"]["description"].startswith("labels_are_known failed: expect_column_values_to_be_in_set(")
    entries = {e["label"]: e for e in typo["evaluation"]["metadataEntries"]}
    assert "| Where is the town of Halden ? | L0C |" in entries["offending_rows"]["mdStr"]
    passed = checks["texts_are_unique"]["executionForLatestMaterialization"]
    assert passed["status"] == "SUCCEEDED" and passed["runId"] == typo["runId"]

    materialized = graphql(port, MATERIALIZATIONS_QUERY, {"path": ["gate", "cleaned_dataset"]})
    assert [m["runId"] for m in materialized["assetOrError"]["assetMaterializations"]] == [typo["runId"]]
    checkpoint = graphql(port, MATERIALIZATIONS_QUERY, {"path": ["gate", "finetuned_checkpoint"]})
    assert checkpoint["assetOrError"] == {} or checkpoint["assetOrError"]["assetMaterializations"] == []


LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""
RUNS_QUERY = """
query Runs { runsOrError(limit: 5) { ... on Runs { results { runId status assetSelection { path }
  tags { key value } } } } }"""


def newest_runs_once_finished(port: int, timeout_s: float) -> list[dict[str, Any]]:
    """The instance's newest runs, newest first, as soon as the newest has finished (or when time is up)."""
    deadline, runs = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        runs = graphql(port, RUNS_QUERY, {})["runsOrError"]["results"]
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(3)
    return runs


@pytest.fixture
def good_workspace(tmp_path: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> dict[str, Path]:
    spec = tiny_spec(BAD / "good.csv", tiny_model_dir)
    spec["task"] = {**spec["task"], "text_column": "text", "label_column": "label"}
    specs = write_spec("gate", spec)
    data = tmp_path / "data"
    workspace = write_workspace(tmp_path, specs, data)
    (tmp_path / "home").mkdir()
    return {"home": tmp_path / "home", "workspace": workspace, "data": data}


@pytest.mark.server
def test_materialize_all_from_the_ui_runs_every_step_in_its_own_process(good_workspace: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """What the UI's "Materialize all" does: launch the job through GraphQL; the daemon-less run launcher
    runs it with the multiprocess executor, each step in its own process."""
    log = tmp_path / "dagster_dev.log"
    with running_dagster_dev(good_workspace["workspace"], good_workspace["home"], log) as port:
        launched = graphql(port, LAUNCH_MUTATION, {"params": {
            "selector": {"repositoryLocationName": "ui_test", "repositoryName": "__repository__",
                         "jobName": "gate_job"}, "runConfigData": {}}})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        runs = newest_runs_once_finished(port, 480)
        assert runs[0]["runId"] == run_id and runs[0]["status"] == "SUCCESS", log.read_text()[-5000:]
        checks = graphql(port, CHECKS_QUERY, {"path": ["gate", "splits"]})["assetNodes"][0]
        statuses = {c["name"]: c["executionForLatestMaterialization"]["status"]
                    for c in checks["assetChecksOrError"]["checks"] if c["blocking"]}
        assert set(statuses.values()) == {"SUCCEEDED"} and len(statuses) == 4
        # The data doctor ran too, in its own process, and only warns (the tiny random model's texts look alike).
        doctor = [c for c in checks["assetChecksOrError"]["checks"] if c["name"] == "labels_look_right"]
        assert len(doctor) == 1 and not doctor[0]["blocking"]
        assert doctor[0]["executionForLatestMaterialization"]["evaluation"]["severity"] == "WARN"
        report = graphql(port, MATERIALIZATIONS_QUERY, {"path": ["gate", "evaluation_report"]})
        assert [m["runId"] for m in report["assetOrError"]["assetMaterializations"]] == [run_id]
    # Steps ran in separate processes, yet the MLflow runs share one parent and the model was registered.
    from mlflow import MlflowClient

    uri = f"sqlite:///{(good_workspace['data'] / 'mlflow' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tuneline/gate").experiment_id])
    parents = [r for r in runs if r.data.tags["tuneline.kind"] == "dagster_run"]
    assert len(parents) == 1 and parents[0].data.tags["dagster.run_id"] == run_id
    children = [r for r in runs if r.data.tags["tuneline.kind"] == "asset"]
    assert len(children) == 6 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert [str(v.version) for v in client.search_model_versions("name = 'gate'")] == ["1"]
