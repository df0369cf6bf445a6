"""Scheduled retraining and the new-data sensor, evaluated with Dagster's testing APIs on a real instance."""

from __future__ import annotations

import pytest

import shutil
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd

from pipelines.core.sources import fingerprint_source, read_source
from pipelines.core.spec import LocalSourceConfig
from pipelines.definitions import build_definitions, resources_for
from tests.conftest import tiny_spec


def test_schedule_skips_unchanged_data_and_sensor_requests_runs_by_content(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    shutil.copy(trec_slice_csv, watched / "questions.csv")
    spec = tiny_spec(watched, tiny_model_dir, retrain_on_new_data=True,
                     schedule={"cron": "0 3 * * 1", "timezone": "UTC"})
    specs = write_spec("tiny", spec)
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    with dg.instance_for_test() as instance:  # a real (temporary) instance: contexts need its reference
        _check_schedule_and_sensor(defs, instance, watched, trec_slice_csv, tmp_path, tiny_model_dir, write_spec)


def _check_schedule_and_sensor(defs: dg.Definitions, instance: dg.DagsterInstance, watched: Path,
                               trec_slice_csv: Path, tmp_path: Path, tiny_model_dir: Path,
                               write_spec: Callable[..., Path]) -> None:
    schedule = defs.resolve_schedule_def("tiny_retraining")
    sensor = defs.resolve_sensor_def("tiny_new_data")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING

    # The fingerprint of the files is the digest raw_data records, without parsing them.
    source = LocalSourceConfig(kind="local", path=str(watched))
    first = fingerprint_source(source, tmp_path)
    assert first == read_source(source, tmp_path)[1].sha256

    # Nothing materialized yet: a scheduled tick requests a run.
    tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert len(tick.run_requests or []) == 1 and tick.run_requests[0].tags["tuneline/source_sha256"] == first

    # Raw data materialized but the pipeline not finished on it: the schedule still runs.
    partial = defs.resolve_job_def("tiny_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(["tiny", "raw_data"])])
    assert partial.success
    assert schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance)
    assert result.success
    # Same bytes and same spec as the last complete run: the schedule skips and says why.
    tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert not tick.run_requests
    assert tick.skip_message == (f"tiny: the raw data is unchanged since Dagster run {result.run_id} (source sha256 "
                                 f"{first[:16]}...) and so is the spec: nothing to retrain")
    # The sensor agrees, and remembers the fingerprint as its cursor.
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    assert not tick.run_requests and "unchanged since Dagster run" in tick.skip_message and tick.cursor == first

    # Same data, but the spec's training section changed: the code version differs, so the schedule runs.
    spec = tiny_spec(watched, tiny_model_dir, retrain_on_new_data=True,
                     schedule={"cron": "0 3 * * 1", "timezone": "UTC"})
    spec["training"]["epochs"] = 3
    changed = build_definitions(specs_dir=write_spec("tiny", spec), data_dir=tmp_path / "data")
    assert changed.resolve_schedule_def("tiny_retraining").evaluate_tick(
        dg.build_schedule_context(instance=instance)).run_requests

    # A new file arrives: the sensor requests a run keyed by the new content; the schedule runs again too.
    pd.read_csv(trec_slice_csv).head(30).to_csv(watched / "more.csv", index=False)
    second = fingerprint_source(source, tmp_path)
    assert second != first
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first))
    assert [r.run_key for r in tick.run_requests] == [second] and tick.cursor == second
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=second))
    assert not tick.run_requests and tick.skip_message.startswith("tiny: source unchanged")
    tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert len(tick.run_requests or []) == 1

    # Changing a file's bytes (same name) is new data as well.
    (watched / "more.csv").write_text((watched / "more.csv").read_text() + '"What is new ?",DESC\n')
    assert fingerprint_source(source, tmp_path) not in (first, second)


def test_no_sensor_without_retrain_on_new_data(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                               write_spec: Callable[..., Path]) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    defs = build_definitions(specs_dir=specs, data_dir=tmp_path / "data")
    assert list(defs.sensors or []) == []


SENSOR_TICKS = """
query Ticks($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) { __typename
  ... on Sensor { sensorState { ticks(limit: 5) { status } } } } }"""


@pytest.mark.server
def test_a_dropped_file_starts_a_run_by_itself(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                               write_spec: Callable[..., Path]) -> None:
    """For real: `dagster dev` with its daemon; a file dropped into the watched folder starts a run."""
    import time

    from pipelines.core.digests import combined_digest, sha256_file
    from tests.test_ui import RUNS_QUERY, graphql, newest_runs_once_finished, running_dagster_dev, write_workspace

    watched = tmp_path / "watched"
    watched.mkdir()
    specs = write_spec("tiny", tiny_spec(watched, tiny_model_dir, retrain_on_new_data=True))
    workspace = write_workspace(tmp_path, specs, tmp_path / "data")
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "dagster_dev.log"
    with running_dagster_dev(workspace, home, log) as port:
        # The daemon evaluates the sensor on the empty folder: a skipped tick, no run.
        selector = {"repositoryName": "__repository__", "repositoryLocationName": "ui_test",
                    "sensorName": "tiny_new_data"}
        deadline, ticks = time.monotonic() + 120, []
        while time.monotonic() < deadline and "SKIPPED" not in ticks:
            time.sleep(2)
            sensor = graphql(port, SENSOR_TICKS, {"selector": selector})["sensorOrError"]
            assert sensor["__typename"] == "Sensor", sensor
            ticks = [t["status"] for t in sensor["sensorState"]["ticks"]]
        assert "SKIPPED" in ticks, (ticks, log.read_text()[-3000:])
        assert graphql(port, RUNS_QUERY, {})["runsOrError"]["results"] == []
        shutil.copy(trec_slice_csv, watched / "questions.csv")
        digest = combined_digest([("questions.csv", sha256_file(watched / "questions.csv"))])
        runs = newest_runs_once_finished(port, 600)
        assert len(runs) == 1 and runs[0]["status"] == "SUCCESS", log.read_text()[-5000:]
        tags = {t["key"]: t["value"] for t in runs[0]["tags"]}
        assert tags["dagster/sensor_name"] == "tiny_new_data" and tags["dagster/run_key"] == digest
        assert tags["tuneline/source_sha256"] == digest
