"""Dagster definitions for every spec in pipelines/specs: assets, checks, jobs, schedules and resources."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.broken import broken_spec_asset
from assets.checks import build_quality_checks
from assets.pipeline import build_pipeline_assets
from assets.scoring import build_scoring_assets, scoring_checks, scoring_job
from pipelines.core.spec import read_specs
from pipelines.jobs import pipeline_job
from pipelines.schedules import pipeline_schedule
from pipelines.sensors import pipeline_sensor, scoring_sensor
from resources.compute import ComputeResource
from resources.models import ModelStoreResource
from resources.storage import PipelineIOManager, StorageResource
from resources.tracking import TrackingResource

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = PROJECT_ROOT / "pipelines" / "specs"
DATA_DIR = PROJECT_ROOT / "data"


def resources_for(data_dir: Path, *, device: str = "auto", num_threads: int | None = None,
                  project_root: Path = PROJECT_ROOT, models: ModelStoreResource | None = None) -> dict[str, object]:
    """The resources of one environment: where data goes, where models come from and which device computes."""
    return {
        "io_manager": PipelineIOManager(data_dir=str(data_dir)),
        "storage": StorageResource(data_dir=str(data_dir)),
        "models": models or ModelStoreResource(project_root=str(project_root), cache_dir=str(data_dir / "models")),
        "compute": ComputeResource(device=device, num_threads=num_threads, cache_dir=str(data_dir / "cache")),
        # The embedded MLflow store under data_dir, unless $TUNELINE_TRACKING_URI names another.
        "tracking": TrackingResource(data_dir=str(data_dir)),
    }


def build_definitions(specs_dir: Path = SPECS_DIR, project_root: Path = PROJECT_ROOT,
                      data_dir: Path = DATA_DIR, resources: dict[str, object] | None = None,
                      loggers: dict[str, dg.LoggerDefinition] | None = None,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """One asset group with its quality checks, one job and (if declared) one schedule per valid spec file; a
    file that does not validate becomes an asset of the `broken_specs` group that says why, and never keeps the
    other pipelines from loading."""
    found = read_specs(specs_dir)
    specs = found.specs
    assets = {spec.name: build_pipeline_assets(spec, project_root) for spec in specs}
    # Each asset's code version (a hash of the spec sections it depends on), for the "nothing changed" rule.
    code_versions = {name: {key.path[-1]: version for a in defs for key, version in a.code_versions_by_key.items()}
                     for name, defs in assets.items()}
    schedules = [s for s in (pipeline_schedule(spec, project_root, code_versions[spec.name]) for spec in specs)
                 if s is not None]
    sensors = [s for s in (pipeline_sensor(spec, project_root, code_versions[spec.name]) for spec in specs)
               if s is not None] + [s for s in (scoring_sensor(spec, project_root) for spec in specs) if s is not None]
    return dg.Definitions(
        assets=[a for spec in specs for a in assets[spec.name] + build_scoring_assets(spec, project_root)]
        + [broken_spec_asset(e) for e in found.broken],
        asset_checks=[c for spec in specs for c in build_quality_checks(spec) + scoring_checks(spec)],
        jobs=[pipeline_job(spec) for spec in specs] + [j for j in map(scoring_job, specs) if j is not None],
        schedules=schedules,
        sensors=sensors,
        resources=resources if resources is not None else resources_for(data_dir, project_root=project_root),
        loggers=loggers,
        executor=executor,
    )


defs = build_definitions()
