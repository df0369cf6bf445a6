"""Data checks of one pipeline: its task's Great Expectations suites (blocking), run on asset values, and the data
doctor (non-blocking: it warns, a person decides)."""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of check functions.

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.files import write_bytes_atomic
from pipelines.core.quality import QualityReport, QualitySuite, examples_markdown, expectations_markdown
from pipelines.core.spec import PipelineSpec
from pipelines.core.steps import doctor_metadata, doctor_verdict, examine_data
from pipelines.core.tasks import task_for
from resources.compute import ComputeResource
from resources.models import ModelStoreResource
from resources.quality import prepare_great_expectations
from resources.storage import StorageResource
from resources.tracking import dagster_value


def _results(report: QualityReport, names: tuple[str, ...], key: dg.AssetKey,
             gx_path: Path) -> Iterator[dg.AssetCheckResult]:
    found = {c.name: c for c in report.checks}
    for name in names:
        outcome = found.get(name)
        if outcome is None:  # a declared check that did not run is a failure, not a pass
            yield dg.AssetCheckResult(
                asset_key=key, check_name=name, passed=False, severity=dg.AssetCheckSeverity.ERROR,
                description=f"{name} did not run: the suite of {key.to_user_string()} produced no result for it",
                metadata={"gx_validation_result": dg.MetadataValue.path(str(gx_path))})
            continue
        yield dg.AssetCheckResult(
            asset_key=key, check_name=name, passed=outcome.passed,
            severity=dg.AssetCheckSeverity.WARN if outcome.severity == "WARN" else dg.AssetCheckSeverity.ERROR,
            description=outcome.summary(),
            metadata={
                "expectations": dg.MetadataValue.md(expectations_markdown(outcome)),
                "failed_expectations": dg.MetadataValue.json([e.expectation for e in outcome.failed_expectations]),
                "offending_rows": dg.MetadataValue.md(examples_markdown(outcome.examples)),
                "offending_row_count": sum(e.unexpected_count or 0 for e in outcome.failed_expectations),
                "to_fix": outcome.fix if not outcome.passed else "",
                "gx_validation_result": dg.MetadataValue.path(str(gx_path)),
            })


def build_quality_checks(spec: PipelineSpec) -> list[dg.AssetChecksDefinition]:
    """The blocking checks of the pipeline's task, one multi-check per checked asset: an ERROR failure stops
    training in the same run. Each reads the checked asset's value and the other assets its suite names. Plus the
    data doctor's check on the splits, when the task has one and the spec does not turn it off."""
    checks = [suite_checks(spec, suite) for suite in task_for(spec).quality_suites(spec)]
    if task_for(spec).doctor_settings(spec) is not None:
        checks.append(doctor_check(spec))
    return checks


DOCTOR_CHECK = "labels_look_right"


def doctor_check(spec: PipelineSpec) -> dg.AssetChecksDefinition:
    key = dg.AssetKey([spec.name, "splits"])
    description = ("Few labels look wrong and no two texts of different labels are near-duplicates (the data "
                   "doctor: out-of-fold probabilities of a linear model on frozen embeddings, ranked by cleanlab; "
                   "plus a learning curve). It warns and never blocks training.")

    @dg.multi_asset_check(
        name=f"{spec.name}__data_doctor",
        specs=[dg.AssetCheckSpec(DOCTOR_CHECK, asset=key, blocking=False, description=description)],
        ins={"value": dg.AssetIn(key)},
        compute_kind="cleanlab",
    )
    def data_doctor(context: dg.AssetCheckExecutionContext, storage: StorageResource, models: ModelStoreResource,
                    compute: ComputeResource, value: pd.DataFrame) -> Iterator[dg.AssetCheckResult]:
        try:
            report, paths = examine_data(spec, value, models, compute.settings(spec.training.precision),
                                         storage.asset_folder(spec.name), progress=context.log.info)
        except Exception as exc:  # the doctor advises: when it cannot run, it says why and the run goes on
            passed, description, metadata = False, f"the data doctor could not run: {type(exc).__name__}: {exc}", {}
        else:
            settings = task_for(spec).doctor_settings(spec)
            passed, description = doctor_verdict(report, settings)
            metadata = doctor_metadata(report, paths, settings.shown_rows)
        (context.log.info if passed else context.log.warning)(f"data doctor: {description}")
        yield dg.AssetCheckResult(asset_key=key, check_name=DOCTOR_CHECK, passed=passed,
                                  severity=dg.AssetCheckSeverity.WARN, description=description,
                                  metadata={k: dagster_value(v) for k, v in metadata.items()})

    return data_doctor


def suite_checks(spec: PipelineSpec, suite: QualitySuite) -> dg.AssetChecksDefinition:
    key = dg.AssetKey([spec.name, suite.asset])
    others = [dg.AssetKey([spec.name, name]) for name in suite.inputs]

    @dg.multi_asset_check(
        name=f"{spec.name}__{suite.asset}_quality",  # op names are global: one per pipeline
        specs=[dg.AssetCheckSpec(name, asset=key, blocking=True, description=suite.descriptions[name],
                                 additional_deps=others) for name in suite.checks],
        ins={"value": dg.AssetIn(key), **{name: dg.AssetIn(k) for name, k in zip(suite.inputs, others, strict=True)}},
        compute_kind="great_expectations",
    )
    def quality(context: dg.AssetCheckExecutionContext, storage: StorageResource, value: pd.DataFrame,
                **inputs: Any) -> Iterator[dg.AssetCheckResult]:
        prepare_great_expectations()
        report = suite.validate(value, **inputs)
        gx_path = storage.asset_folder(spec.name) / f"{suite.asset}.gx_validation.json"
        write_bytes_atomic(gx_path, json.dumps(report.gx_result, indent=2, default=str).encode())
        for outcome in report.checks:  # each check in the Dagster log; the terminal shows the failures and the count
            (context.log.debug if outcome.passed else context.log.error)(outcome.summary())
        passed = sum(outcome.passed for outcome in report.checks)
        context.log.info(f"{passed} of {len(report.checks)} checks on {suite.asset} passed"
                         + ("" if passed == len(report.checks) else
                            f"; failed: {', '.join(o.name for o in report.checks if not o.passed)}"))
        yield from _results(report, suite.checks, key, gx_path)

    return quality
