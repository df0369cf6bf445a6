"""Batch scoring with the champion: incoming_data (blocking checks) -> scored_data, its job, sensor and lineage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from pipelines.core.scoring import EMPTY, ID, NO_COLUMN, read_incoming, validate_incoming
from pipelines.core.sections import ScoringConfig
from pipelines.definitions import build_definitions, resources_for
from resources.tracking import TrackingResource
from tests.conftest import PROJECT_ROOT, tiny_spec, write_trec_slice

NEW_QUESTIONS = ["How far is the Moon from the Earth ?", "Who wrote Hamlet ?", "What is the capital of Peru ?",
                 "When did the Berlin Wall fall ?"]


def _scoring(root: Path, **overrides: Any) -> dict[str, Any]:
    return {"incoming": str(root / "incoming"), "output": str(root / "scored"), "column": "question",
            **overrides}


@pytest.fixture(scope="module")
def scoring_project(tmp_path_factory: pytest.TempPathFactory, trec_lines: list[str],
                    tiny_model_dir: Path) -> dict[str, Any]:
    """A tiny pipeline with a scoring section, trained once for the module; version 1 is the champion."""
    root = tmp_path_factory.mktemp("scoring")
    (root / "incoming").mkdir()
    specs = root / "specs"
    specs.mkdir()
    spec = tiny_spec(write_trec_slice(root, trec_lines), tiny_model_dir, scoring=_scoring(root))
    (specs / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    data_dir = root / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    home = root / "home"  # a persistent instance: the daemon test's dagster dev reads the training records too
    home.mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    trained = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance)
    assert trained.success
    # A training run never scores: the scoring assets are not in the pipeline's job.
    materialized = {e.asset_key.path[-1] for e in trained.get_asset_materialization_events()}
    assert "evaluation_report" in materialized and not materialized & {"incoming_data", "scored_data"}
    tracking = TrackingResource(data_dir=str(data_dir))
    if tracking.champion_version("tiny") is None:
        tracking.promote("tiny", "1", "test setup")
    return {"root": root, "specs": specs, "data_dir": data_dir, "defs": defs, "instance": instance, "home": home}


def _predict(data_dir: Path, texts: list[str]) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "--json",
                          "--data-dir", str(data_dir), *texts], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_incoming_rows_say_why_they_cannot_be_scored(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pd.DataFrame({"question": ["Who wrote Hamlet ?", "", "TCK-00123", "42", "What is a comet ?"],
                  "ticket": [1, 2, 3, 4, 5]}).to_csv(incoming / "a.csv", index=False)
    (incoming / "b.jsonl").write_text('{"body": "no question column here"}\n', encoding="utf-8")
    (incoming / ".c.csv.tmp").write_text("question\nhalf-written\n", encoding="utf-8")  # hidden: not read
    cfg = ScoringConfig(incoming=str(incoming), output=str(tmp_path / "out"), column="question",
                        max_unscorable_fraction=0.2)
    rows, log = read_incoming(cfg, tmp_path, "tiny")
    assert rows["not_scored_because"].tolist() == [None, EMPTY, ID, ID, None, NO_COLUMN]
    assert rows["source_file"].tolist() == ["incoming/a.csv"] * 5 + ["incoming/b.jsonl"]
    assert rows["ticket"].tolist()[:5] == ["1", "2", "3", "4", "5"]  # its own columns come along (CSV cells as text)
    assert log.metadata["unscorable_rows"] == 4 and len(log.metadata["incoming_files"]) == 2
    report = validate_incoming(rows, cfg)
    outcome = {c.name: c for c in report.checks}
    assert not outcome["incoming_files_have_the_column"].passed
    assert not outcome["incoming_rows_are_scorable"].passed  # 4 of 6 > 20%
    (incoming / "b.jsonl").unlink()
    rows, _ = read_incoming(cfg, tmp_path, "tiny")
    outcome = {c.name: c for c in validate_incoming(rows, cfg).checks}
    assert outcome["incoming_files_have_the_column"].passed and not outcome["incoming_rows_are_scorable"].passed
    relaxed = cfg.model_copy(update={"max_unscorable_fraction": 0.6})
    assert all(c.passed for c in validate_incoming(rows, relaxed).checks)


def test_scored_data_answers_as_predict_keeps_unscorable_rows_and_lineage_finds_the_version(
        scoring_project: dict[str, Any]) -> None:
    root, data_dir, defs, instance = (scoring_project[k] for k in ("root", "data_dir", "defs", "instance"))
    incoming = root / "incoming"
    pd.DataFrame({"question": NEW_QUESTIONS + ["", "INV-2024-0042"], "id": range(6)}).to_csv(
        incoming / "monday.csv", index=False)
    job = defs.resolve_job_def("tiny_scoring_job")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success  # 2 of 6 rows cannot be scored: over the 5% the check allows, so scoring is blocked
    assert not (root / "scored").exists()
    (incoming / "monday.csv").unlink()
    pd.DataFrame({"question": NEW_QUESTIONS * 10 + ["INV-2024-0042"], "id": range(41)}).to_csv(
        incoming / "monday.csv", index=False)
    result = job.execute_in_process(instance=instance)
    assert result.success
    scored = pd.read_parquet(root / "scored" / "monday.csv.scored.parquet")
    assert len(scored) == 41 and scored["id"].tolist() == [str(i) for i in range(41)]  # every row, in order
    expected = _predict(data_dir, NEW_QUESTIONS)
    assert scored["prediction"].tolist()[:4] == [r["label"] for r in expected]
    assert scored["score"].round(4).tolist()[:4] == [r["probability"] for r in expected]
    assert scored["model_version"].tolist()[:40] == ["1"] * 40 and pd.isna(scored["model_version"].iat[40])
    assert scored["not_scored_because"].tolist()[-1] == ID
    meta = result.asset_materializations_for_node("tiny__scored_data")[0].metadata
    assert meta["model_version"].value == "1" and meta["rows_per_second"].value > 0
    # Lineage: which version scored this file, with the digests of what it read and wrote.
    from pipelines.lineage import scorings

    [scoring] = scorings(instance, "tiny")
    [scored_file] = scoring["files"]
    assert scoring["model_version"] == "1" and scored_file["rows"] == 41 and scored_file["scored"] == 40
    from pipelines.core.digests import sha256_file

    assert scored_file["sha256"] == sha256_file(incoming / "monday.csv")
    assert scored_file["output_sha256"] == sha256_file(root / "scored" / "monday.csv.scored.parquet")


def test_the_scoring_sensor_asks_for_a_run_when_files_arrive_or_the_champion_moves(
        scoring_project: dict[str, Any]) -> None:
    root, defs, instance, data_dir = (scoring_project[k] for k in ("root", "defs", "instance", "data_dir"))
    sensor = defs.resolve_sensor_def("tiny_scoring")
    tracking = TrackingResource(data_dir=str(data_dir))
    context = dg.build_sensor_context(instance=instance, resources={"tracking": tracking})
    incoming = root / "incoming"
    for f in incoming.iterdir():
        f.unlink()
    tick = sensor.evaluate_tick(context)
    assert not tick.run_requests and "no files to score" in tick.skip_message
    pd.DataFrame({"question": NEW_QUESTIONS}).to_csv(incoming / "tuesday.csv", index=False)
    tick = sensor.evaluate_tick(context)
    [request] = tick.run_requests
    assert request.tags["tuneline/champion_version"] == "1"
    again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=tick.cursor,
                                                         resources={"tracking": tracking}))
    assert not again.run_requests and "unchanged" in again.skip_message
    # The champion moves to another version: everything is scored again.
    client = tracking.client()
    moved = client.create_model_version("tiny", source=client.get_model_version("tiny", "1").source,
                                        run_id=client.get_model_version("tiny", "1").run_id).version
    tracking.promote("tiny", str(moved), "test: the champion moves")
    try:
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=tick.cursor,
                                                            resources={"tracking": tracking}))
        assert [r.tags["tuneline/champion_version"] for r in tick.run_requests] == [str(moved)]
    finally:
        tracking.promote("tiny", "1", "test: back")


@pytest.mark.server
def test_a_file_dropped_into_incoming_is_scored_by_the_daemon(scoring_project: dict[str, Any],
                                                              tmp_path: Path) -> None:
    """For real: `dagster dev` with its daemon; a file dropped into the incoming folder is scored by the sensor's
    run, with the champion of the registry the pipeline trained into."""
    from tests.test_retraining import SENSOR_TICKS
    from tests.test_ui import RUNS_QUERY, graphql, running_dagster_dev, write_workspace

    root, specs, data_dir = scoring_project["root"], scoring_project["specs"], scoring_project["data_dir"]
    incoming = root / "incoming"
    for f in incoming.iterdir():
        f.unlink()
    shutil.rmtree(root / "scored", ignore_errors=True)
    workspace = write_workspace(tmp_path, specs, data_dir)
    home = scoring_project["home"]
    log = tmp_path / "dagster_dev.log"
    with running_dagster_dev(workspace, home, log) as port:
        selector = {"repositoryName": "__repository__", "repositoryLocationName": "ui_test",
                    "sensorName": "tiny_scoring"}
        deadline, ticks = time.monotonic() + 120, []
        while time.monotonic() < deadline and "SKIPPED" not in ticks:
            time.sleep(2)
            sensor = graphql(port, SENSOR_TICKS, {"selector": selector})["sensorOrError"]
            assert sensor["__typename"] == "Sensor", sensor
            ticks = [t["status"] for t in sensor["sensorState"]["ticks"]]
        assert "SKIPPED" in ticks, (ticks, log.read_text()[-3000:])
        pd.DataFrame({"question": NEW_QUESTIONS}).to_csv(incoming / "wednesday.csv", index=False)
        deadline, run = time.monotonic() + 600, None
        while time.monotonic() < deadline:  # the instance also holds this module's earlier runs: find the sensor's
            runs = graphql(port, RUNS_QUERY, {})["runsOrError"]["results"]
            run = next((r for r in runs if {"key": "dagster/sensor_name", "value": "tiny_scoring"} in r["tags"]), None)
            if run is not None and run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(3)
        assert run is not None and run["status"] == "SUCCESS", log.read_text()[-5000:]
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags["dagster/sensor_name"] == "tiny_scoring" and tags["tuneline/champion_version"] == "1"
    scored = pd.read_parquet(root / "scored" / "wednesday.csv.scored.parquet")
    assert scored["model_version"].tolist() == ["1"] * 4
    assert scored["prediction"].tolist() == [r["label"] for r in _predict(data_dir, NEW_QUESTIONS)]
    # `tuneline lineage` answers both ways from the instance the daemon recorded into.
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    common = ["--specs-dir", str(specs), "--data-dir", str(data_dir), "--json"]
    by_file = subprocess.run([sys.executable, "-m", "pipelines.cli", "lineage", "--data",
                              str(incoming / "wednesday.csv"), *common], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert by_file.returncode == 0, by_file.stderr[-3000:]
    [scorer] = json.loads(by_file.stdout)["scored_by"]
    assert (scorer["pipeline"], scorer["version"], scorer["rows"]) == ("tiny", "1", 4)
    assert scorer["output"].endswith("wednesday.csv.scored.parquet")
    by_version = subprocess.run([sys.executable, "-m", "pipelines.cli", "lineage", "--pipeline", "tiny", "--version",
                                 "1", *common], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert by_version.returncode == 0, by_version.stderr[-3000:]
    lineage = json.loads(by_version.stdout)
    assert lineage["raw_files"] and lineage["base_model"]["name"] == "tiny-bert"  # trained from, and scored:
    assert str(incoming / "wednesday.csv") in [f["file"] for x in lineage["scored"] for f in x["files"]]
