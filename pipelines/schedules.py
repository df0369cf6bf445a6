"""Retraining schedules declared in specs."""

from __future__ import annotations

import dagster as dg

from pipelines.core.spec import PipelineSpec
from pipelines.jobs import job_name


def pipeline_schedule(spec: PipelineSpec) -> dg.ScheduleDefinition | None:
    """The spec's retraining schedule, stopped unless the spec enables it."""
    if spec.schedule is None:
        return None
    return dg.ScheduleDefinition(
        name=f"{spec.name}_retraining",
        job_name=job_name(spec),
        cron_schedule=spec.schedule.cron,
        execution_timezone=spec.schedule.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING if spec.schedule.enabled else dg.DefaultScheduleStatus.STOPPED,
        description=f"Retrain {spec.name} on '{spec.schedule.cron}' ({spec.schedule.timezone}).",
    )
