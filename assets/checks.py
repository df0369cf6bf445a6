"""Blocking data-quality checks of one pipeline: Great Expectations suites on cleaned_dataset and splits."""
# No `from __future__ import annotations` here: Dagster inspects the real annotations of check functions.

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from pipelines.core.files import write_bytes_atomic
from pipelines.core.quality import (RENDERED_CHECKS, CheckOutcome, QualityFn, QualityReport, cleaned_checks_for,
                                    splits_checks_for, validate_cleaned_dataset, validate_rendered_dataset,
                                    validate_splits)
from pipelines.core.spec import PipelineSpec
from resources.storage import StorageResource

DESCRIPTIONS = {
    "cleaned_dataset_has_required_columns": "The text and label columns exist and hold strings.",
    "texts_are_present": "No text or label is null or blank.",
    "labels_are_known": "Every label is declared in task.labels (or, without them, frequent enough not to be a typo).",
    "text_lengths_within_bounds": "Every text length is within quality.min_text_chars and quality.max_text_chars.",
    "texts_are_unique": "No normalised text occurs twice (within a split, when the source brings splits).",
    "row_count_within_bounds": "The row count is within quality.min_rows and quality.max_rows.",
    "classes_are_balanced": "No class is much smaller than the largest (warning, or error when far off).",
    "splits_do_not_overlap": "No normalised text is in two splits.",
    "split_proportions_match_spec": "Split shares are within quality.split_tolerance of the spec.",
    "every_class_in_train_and_test": "Every class has rows in train and in test.",
    "validation_and_test_are_not_empty": "Validation and test have rows.",
    "responses_are_present": "No instruction or response is null or blank.",
    "roles_alternate": "Every conversation is (system), user, assistant, ... alternating and ends with the assistant.",
    "examples_are_unique": "No instruction occurs twice with the same response.",
    "rendered_lengths_within_max_length": "Rendered examples fit training.max_length; few were dropped or truncated.",
    "prompt_tokens_carry_no_loss": "The loss mask is 0 on every prompt token and 1 on every response token.",
}


def _cell(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _expectations_md(outcome: CheckOutcome) -> str:
    lines = ["| expectation | threshold / arguments | observed | passed | severity |", "|---|---|---|---|---|"]
    for e in outcome.expectations:
        observed = (f"{e.unexpected_count} unexpected rows" if e.unexpected_count is not None
                    else "—" if e.observed is None else e.observed)
        lines.append(f"| {e.expectation} | {_cell(e.kwargs)} | {_cell(observed)} | {'yes' if e.success else 'NO'} "
                     f"| {e.severity} |")
    return "\n".join(lines)


def _examples_md(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no offending rows"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _write_gx_result(path: Path, report: QualityReport) -> None:
    write_bytes_atomic(path, json.dumps(report.gx_result, indent=2, default=str).encode())


def _results(report: QualityReport, names: tuple[str, ...], key: dg.AssetKey,
             gx_path: Path) -> Iterator[dg.AssetCheckResult]:
    found = {c.name: c for c in report.checks}
    for name in names:
        outcome = found.get(name)
        if outcome is None:  # a check whose columns are missing cannot run: that is a failure, not a pass
            yield dg.AssetCheckResult(
                asset_key=key, check_name=name, passed=False, severity=dg.AssetCheckSeverity.ERROR,
                description=f"{name} could not run: cleaned_dataset_has_required_columns failed",
                metadata={"gx_validation_result": dg.MetadataValue.path(str(gx_path))})
            continue
        yield dg.AssetCheckResult(
            asset_key=key, check_name=name, passed=outcome.passed,
            severity=dg.AssetCheckSeverity.WARN if outcome.severity == "WARN" else dg.AssetCheckSeverity.ERROR,
            description=outcome.summary(),
            metadata={
                "expectations": dg.MetadataValue.md(_expectations_md(outcome)),
                "failed_expectations": dg.MetadataValue.json([e.expectation for e in outcome.failed_expectations]),
                "offending_rows": dg.MetadataValue.md(_examples_md(outcome.examples)),
                "offending_row_count": sum(e.unexpected_count or 0 for e in outcome.failed_expectations),
                "to_fix": outcome.fix if not outcome.passed else "",
                "gx_validation_result": dg.MetadataValue.path(str(gx_path)),
            })


def build_quality_checks(spec: PipelineSpec) -> list[dg.AssetChecksDefinition]:
    """Blocking checks on cleaned_dataset and splits: an ERROR failure stops training in the same run."""

    def suite_checks(asset: str, names: tuple[str, ...], validate: QualityFn) -> dg.AssetChecksDefinition:
        key = dg.AssetKey([spec.name, asset])

        @dg.multi_asset_check(
            name=f"{spec.name}__{asset}_quality",  # op names are global: one per pipeline
            specs=[dg.AssetCheckSpec(name, asset=key, blocking=True, description=DESCRIPTIONS[name])
                   for name in names],
            ins={"value": dg.AssetIn(key)},
            compute_kind="great_expectations",
        )
        def quality(context: dg.AssetCheckExecutionContext, storage: StorageResource,
                    value: pd.DataFrame) -> Iterator[dg.AssetCheckResult]:
            report = validate(value, spec)
            gx_path = storage.asset_folder(spec.name) / f"{asset}.gx_validation.json"
            _write_gx_result(gx_path, report)
            for outcome in report.checks:
                log = context.log.info if outcome.passed else context.log.error
                log(outcome.summary())
            yield from _results(report, names, key, gx_path)

        return quality

    checks = [suite_checks("cleaned_dataset", cleaned_checks_for(spec), validate_cleaned_dataset),
              suite_checks("splits", splits_checks_for(spec), validate_splits)]
    if spec.task.type == "instruction_tuning":
        checks.append(rendered_checks(spec))
    return checks


def rendered_checks(spec: PipelineSpec) -> dg.AssetChecksDefinition:
    """Blocking checks on rendered_dataset (instruction tuning): lengths and the loss mask."""
    key = dg.AssetKey([spec.name, "rendered_dataset"])

    @dg.multi_asset_check(
        name=f"{spec.name}__rendered_dataset_quality",
        specs=[dg.AssetCheckSpec(name, asset=key, blocking=True, description=DESCRIPTIONS[name])
               for name in RENDERED_CHECKS],
        ins={"value": dg.AssetIn(key)},
        compute_kind="great_expectations",
    )
    def quality(context: dg.AssetCheckExecutionContext, storage: StorageResource,
                value: pd.DataFrame) -> Iterator[dg.AssetCheckResult]:
        # How many split rows went in is in the materialization's metadata (dropped rows are not in the table).
        event = context.instance.get_latest_materialization_event(key)
        metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
        rows_in = metadata["rows_in"].value if "rows_in" in metadata else len(value)
        report = validate_rendered_dataset(value, spec, rows_in=int(rows_in))
        gx_path = storage.asset_folder(spec.name) / "rendered_dataset.gx_validation.json"
        _write_gx_result(gx_path, report)
        for outcome in report.checks:
            (context.log.info if outcome.passed else context.log.error)(outcome.summary())
        yield from _results(report, RENDERED_CHECKS, key, gx_path)

    return quality
