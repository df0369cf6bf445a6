"""Retraining when the data changes: a sensor on the source's files, and the rule that a scheduled run
with unchanged data skips instead of retraining."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from pipelines.core.sources import fingerprint_source
from pipelines.core.spec import PipelineSpec
from pipelines.jobs import job_name

SOURCE_TAG = "tuneline/source_sha256"


def last_raw_data(instance: dg.DagsterInstance, spec: PipelineSpec) -> tuple[str | None, str | None]:
    """The data version and Dagster run of the pipeline's latest raw_data materialization."""
    event = instance.get_latest_materialization_event(dg.AssetKey([spec.name, "raw_data"]))
    if event is None or event.asset_materialization is None:
        return None, None
    return (event.asset_materialization.tags or {}).get("dagster/data_version"), event.run_id


def unchanged_reason(instance: dg.DagsterInstance, spec: PipelineSpec, fingerprint: str | None) -> str | None:
    """Why there is nothing to retrain (the source's bytes equal the last materialized raw data), or None."""
    if fingerprint is None:
        return None
    version, run_id = last_raw_data(instance, spec)
    if version is not None and version == fingerprint[:32]:
        return (f"{spec.name}: the raw data is unchanged since Dagster run {run_id} (source sha256 "
                f"{fingerprint[:16]}...): nothing to retrain")
    return None


def pipeline_sensor(spec: PipelineSpec, project_root: Path) -> dg.SensorDefinition | None:
    """Requests a run when the source's files change; the run key is their content digest."""
    if not spec.retrain_on_new_data or spec.source.kind == "hub":
        return None

    @dg.sensor(name=f"{spec.name}_new_data", job_name=job_name(spec), minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Retrain {spec.name} when the files of its source change.")
    def new_data(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        fingerprint = fingerprint_source(spec.source, project_root)
        assert fingerprint is not None
        if context.cursor == fingerprint:
            return dg.SkipReason(f"{spec.name}: source unchanged (sha256 {fingerprint[:16]}...)")
        reason = unchanged_reason(context.instance, spec, fingerprint)
        if reason is not None:
            return dg.SensorResult(skip_reason=reason, cursor=fingerprint)
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint, tags={SOURCE_TAG: fingerprint})],
                               cursor=fingerprint)

    return new_data
