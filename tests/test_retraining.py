"""Scheduled retraining and the new-data sensor, evaluated with Dagster's testing APIs on a real instance."""

from __future__ import annotations

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
        _check_schedule_and_sensor(defs, instance, watched, trec_slice_csv, tmp_path)


def _check_schedule_and_sensor(defs: dg.Definitions, instance: dg.DagsterInstance, watched: Path,
                               trec_slice_csv: Path, tmp_path: Path) -> None:
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

    result = defs.resolve_job_def("tiny_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(["tiny", "raw_data"])])
    assert result.success
    # Same bytes as the last materialization: the schedule skips and says why.
    tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert not tick.run_requests
    assert tick.skip_message == (f"tiny: the raw data is unchanged since Dagster run {result.run_id} (source sha256 "
                                 f"{first[:16]}...): nothing to retrain")
    # The sensor agrees, and remembers the fingerprint as its cursor.
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    assert not tick.run_requests and "unchanged since Dagster run" in tick.skip_message and tick.cursor == first

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
