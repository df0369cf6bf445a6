"""Retraining schedules declared in specs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from pipelines.core.errors import SourceError
from pipelines.core.sources import fingerprint_sources
from pipelines.core.tasks import task_for
from pipelines.core.spec import PipelineSpec
from pipelines.jobs import job_name
from pipelines.sensors import SOURCE_TAG, unchanged_reason


def pipeline_schedule(spec: PipelineSpec, project_root: Path,
                      code_versions: Mapping[str, str | None]) -> dg.ScheduleDefinition | None:
    """The spec's retraining schedule, stopped unless the spec enables it. A tick whose source bytes equal the
    last materialized raw data skips, saying so, instead of retraining on the same data."""
    if spec.schedule is None:
        return None

    def evaluate(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        try:
            fingerprint = fingerprint_sources(spec.source, task_for(spec).side_sources(spec), project_root)
        except SourceError:
            fingerprint = None  # the run itself reports the missing source with its path
        reason = unchanged_reason(context.instance, spec, fingerprint, code_versions)
        if reason is not None:
            return dg.SkipReason(reason)
        return dg.RunRequest(tags={SOURCE_TAG: fingerprint} if fingerprint else {})

    return dg.ScheduleDefinition(
        name=f"{spec.name}_retraining",
        job_name=job_name(spec),
        cron_schedule=spec.schedule.cron,
        execution_timezone=spec.schedule.timezone,
        execution_fn=evaluate,
        default_status=dg.DefaultScheduleStatus.RUNNING if spec.schedule.enabled else dg.DefaultScheduleStatus.STOPPED,
        description=f"Retrain {spec.name} on '{spec.schedule.cron}' ({spec.schedule.timezone}) when its data changed.",
    )
