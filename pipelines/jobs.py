"""One job per pipeline: materialize its whole asset group."""

from __future__ import annotations

import dagster as dg

from pipelines.core.spec import PipelineSpec


def job_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_job"


def pipeline_job(spec: PipelineSpec) -> dg.UnresolvedAssetJobDefinition:
    """Materialize every asset of the pipeline, from raw data to the evaluation report (batch scoring has its own
    job: a training run never scores)."""
    from assets.scoring import scoring_keys

    selection = dg.AssetSelection.groups(spec.name) - dg.AssetSelection.assets(*scoring_keys(spec))
    return dg.define_asset_job(job_name(spec), selection=selection,
                               description=f"Materialize the {spec.name} pipeline end to end.",
                               tags={"tuneline/pipeline": spec.name})
