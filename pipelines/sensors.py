"""Retraining when the data changes: a sensor on the source's files, and the rule that a scheduled run
with unchanged data skips instead of retraining."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from pipelines.core.errors import SourceError
from pipelines.core.scoring import sensor_fingerprint
from pipelines.core.sources import fingerprint_sources
from pipelines.core.tasks import task_for
from pipelines.core.spec import PipelineSpec
from pipelines.jobs import job_name
from resources.tracking import TrackingResource

SOURCE_TAG = "tuneline/source_sha256"


def unchanged_reason(instance: dg.DagsterInstance, spec: PipelineSpec, fingerprint: str | None,
                     code_versions: Mapping[str, str | None]) -> str | None:
    """Why there is nothing to retrain, or None: the source's bytes equal the last materialized raw data,
    every asset was last materialized with its current code version (the spec's sections), and the pipeline
    got as far as an evaluation report after that raw data."""
    if fingerprint is None:
        return None
    raw = instance.get_latest_materialization_event(dg.AssetKey([spec.name, "raw_data"]))
    if raw is None or raw.asset_materialization is None:
        return None
    if (raw.asset_materialization.tags or {}).get("dagster/data_version") != fingerprint[:32]:
        return None
    report = instance.get_latest_materialization_event(dg.AssetKey([spec.name, "evaluation_report"]))
    if report is None or report.timestamp < raw.timestamp:
        return None  # the last run on this data did not finish: run again
    for name, version in code_versions.items():
        event = instance.get_latest_materialization_event(dg.AssetKey([spec.name, name]))
        recorded = (event.asset_materialization.tags or {}).get("dagster/code_version") \
            if event and event.asset_materialization else None
        if recorded != version:
            return None  # the spec changed this asset (or it was never materialized)
    return (f"{spec.name}: the raw data is unchanged since Dagster run {raw.run_id} (source sha256 "
            f"{fingerprint[:16]}...) and so is the spec: nothing to retrain")


def pipeline_sensor(spec: PipelineSpec, project_root: Path,
                    code_versions: Mapping[str, str | None]) -> dg.SensorDefinition | None:
    """Requests a run when the source's files change; the run key is their content digest."""
    if not spec.retrain_on_new_data or spec.source.kind == "hub":
        return None

    @dg.sensor(name=f"{spec.name}_new_data", job_name=job_name(spec), minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Retrain {spec.name} when the files of its source change.")
    def new_data(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        try:
            fingerprint = fingerprint_sources(spec.source, task_for(spec).side_sources(spec), project_root)
        except SourceError as exc:  # e.g. the watched folder does not exist yet
            return dg.SkipReason(f"{spec.name}: {exc}")
        if fingerprint is None:
            return dg.SkipReason(f"{spec.name}: no data files in {spec.source.path} yet")  # type: ignore[union-attr]
        if context.cursor == fingerprint:
            return dg.SkipReason(f"{spec.name}: source unchanged (sha256 {fingerprint[:16]}...)")
        reason = unchanged_reason(context.instance, spec, fingerprint, code_versions)
        if reason is not None:
            return dg.SensorResult(skip_reason=reason, cursor=fingerprint)
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint, tags={SOURCE_TAG: fingerprint})],
                               cursor=fingerprint)

    return new_data


def scoring_sensor(spec: PipelineSpec, project_root: Path) -> dg.SensorDefinition | None:
    """Requests a scoring run when the files of scoring.incoming change or the champion moves to another version;
    the run key is a digest of both."""
    if spec.scoring is None or not spec.scoring.watch:
        return None
    cfg = spec.scoring

    @dg.sensor(name=f"{spec.name}_scoring", job_name=f"{spec.name}_scoring_job", minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Score the new files of {cfg.incoming} (and all of them again when the champion moves).")
    def new_files_to_score(context: dg.SensorEvaluationContext,
                           tracking: TrackingResource) -> dg.SensorResult | dg.SkipReason:
        champion = tracking.champion_version(spec.name)
        if champion is None:
            return dg.SkipReason(f"{spec.name}: no champion in the model registry yet")
        fingerprint = sensor_fingerprint(cfg, project_root, champion)
        if fingerprint is None:
            return dg.SkipReason(f"{spec.name}: no files to score in {cfg.incoming}")
        if context.cursor == fingerprint:
            return dg.SkipReason(f"{spec.name}: the files in {cfg.incoming} and the champion (v{champion}) are "
                                 "unchanged since the last scoring run")
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=fingerprint,
                                                           tags={"tuneline/champion_version": champion})],
                               cursor=fingerprint)

    return new_files_to_score
