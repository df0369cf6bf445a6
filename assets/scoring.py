"""Batch scoring with the champion: incoming_data (new unlabelled files, with blocking checks) -> scored_data
(each row with the prediction, its score and the model version), downstream of evaluation_report, where the
champion is decided. Materialized by the pipeline's scoring job and its sensor, never by a training run."""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of asset functions.

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets.checks import suite_checks
from pipelines.core.errors import TunelineError
from pipelines.core.quality import QualitySuite
from pipelines.core.scoring import DESCRIPTIONS, INCOMING_CHECKS, read_incoming, score_rows, scoring_log, \
    validate_incoming, write_scored
from pipelines.core.spec import PipelineSpec
from pipelines.core.tasks import task_for
from resources.compute import ComputeResource
from resources.tracking import TrackingResource

INCOMING, SCORED = "incoming_data", "scored_data"


def scoring_keys(spec: PipelineSpec) -> list[dg.AssetKey]:
    return [dg.AssetKey([spec.name, INCOMING]), dg.AssetKey([spec.name, SCORED])] if spec.scoring else []


def build_scoring_assets(spec: PipelineSpec, project_root: Path) -> list[dg.AssetsDefinition]:
    """The scoring assets of a spec with a `scoring:` section (none without one)."""
    cfg = spec.scoring
    if cfg is None:
        return []
    task = task_for(spec)
    common = {"key_prefix": [spec.name], "group_name": spec.name}

    @dg.asset(**common, name=INCOMING, code_version=spec.section_hash("scoring"), kinds={"pandas", "greatexpectations"})
    def incoming_data(context: dg.AssetExecutionContext, tracking: TrackingResource) -> dg.Output[pd.DataFrame]:
        """Every file in the spec's scoring.incoming folder as rows, each with the file, row and file sha256 it came
        from and why it cannot be scored (no text column, empty, an id), if it cannot."""
        with tracking.asset_run(context, spec.name) as run:
            return run.output(*read_incoming(cfg, project_root, spec.name))

    @dg.asset(**common, name=SCORED, ins={"incoming_data": dg.AssetIn(dg.AssetKey([spec.name, INCOMING]))},
              deps=[dg.AssetKey([spec.name, "evaluation_report"])], code_version=spec.section_hash("scoring"),
              kinds={"pytorch", "mlflow", "parquet"})
    def scored_data(context: dg.AssetExecutionContext, tracking: TrackingResource, compute: ComputeResource,
                    incoming_data: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """The incoming rows answered by the registry's champion, written as Parquet to scoring.output (one file per
        incoming file), each row with the prediction, its score and the model version; rows that cannot be scored
        are kept with the reason."""
        with tracking.asset_run(context, spec.name) as run:
            champion = tracking.champion_checkpoint(spec.name)
            if champion is None or champion.model_version is None:
                raise TunelineError(f"{spec.name} has no champion in the model registry at {tracking.tracking_uri()} "
                                    f"to score with; materialize the pipeline until a version is promoted")
            context.log.info(f"scoring {len(incoming_data):,} rows with {spec.name} v{champion.model_version}")
            answer = task.predictor(champion, compute.settings("fp32"))
            scored, seconds = score_rows(incoming_data, answer, task.serving, champion.model_version,
                                         cfg.batch_size, progress=context.log.info)
            step = scoring_log(scored, write_scored(scored, cfg.output, project_root), champion.model_version,
                               seconds)
            return run.output(scored, step)

    return [incoming_data, scored_data]


def scoring_checks(spec: PipelineSpec) -> list[dg.AssetChecksDefinition]:
    """The blocking checks of incoming_data: scoring does not start when they fail."""
    cfg = spec.scoring
    if cfg is None:
        return []
    suite = QualitySuite(INCOMING, INCOMING_CHECKS, DESCRIPTIONS, lambda value: validate_incoming(value, cfg))
    return [suite_checks(spec, suite)]


def scoring_job(spec: PipelineSpec) -> Any:
    if spec.scoring is None:
        return None
    return dg.define_asset_job(f"{spec.name}_scoring_job", selection=dg.AssetSelection.assets(*scoring_keys(spec)),
                               description=f"Score the new files of {spec.scoring.incoming} with the champion of "
                                           f"{spec.name}.", tags={"tuneline/pipeline": spec.name})
