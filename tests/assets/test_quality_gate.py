"""The data-quality gate: every bad input stops before training, with an error or a failed blocking check."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from pipelines.definitions import build_definitions, resources_for
from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.fixtures.bad_inputs.make_bad_inputs import huge_row_csv

BAD = PROJECT_ROOT / "tests" / "fixtures" / "bad_inputs"
LABELS = ["DESC", "HUM", "LOC", "NUM"]


def run_pipeline(tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path, source: dict[str, Any],
                 doctor: dict[str, Any] | None = None,
                 **overrides: Any) -> tuple[dg.ExecuteInProcessResult, dg.DagsterInstance, Path]:
    spec = tiny_spec(BAD / "good.csv", tiny_model_dir, **overrides)
    spec["source"] = source
    spec["task"] = {**spec["task"], "text_column": "text", "label_column": "label", "labels": LABELS,
                    "doctor": {**spec["task"]["doctor"], **(doctor or {})}}
    specs = write_spec("gate", spec)
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("gate_job").execute_in_process(instance=instance, raise_on_error=False)
    return result, instance, data_dir


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def assert_no_training(result: dg.ExecuteInProcessResult, data_dir: Path) -> None:
    assert "finetuned_checkpoint" not in materialized(result)
    assert "evaluation_report" not in materialized(result)
    assert not (data_dir / "checkpoints").exists()
    assert not list((data_dir / "assets").rglob("finetuned_checkpoint*"))


def step_error(result: dg.ExecuteInProcessResult, asset: str) -> str:
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.step_key == f"gate__{asset}":
            error = event.event_specific_data.error
            while error.cause is not None:
                error = error.cause
            return error.message.strip()
    raise AssertionError(f"step {asset} did not fail")


def local(path: Path, **kw: Any) -> dict[str, Any]:
    return {"kind": "local", "path": str(path), **kw}


ERRORS = [
    pytest.param("empty.csv", "raw_data", "empty.csv: is empty (0 data rows)", id="empty-file"),
    pytest.param("header_only.csv", "raw_data", "header_only.csv: has a header but no data rows", id="header-only"),
    pytest.param("missing_label_column.csv", "cleaned_dataset",
                 "missing_label_column.csv, column 'label': has no column 'label' (named by task.label_column); "
                 "its columns are ['text']", id="missing-label-column"),
    pytest.param("non_utf8.csv", "raw_data", "non_utf8.csv, row 102: not valid UTF-8: byte 0xf9", id="non-utf8"),
    pytest.param("not_csv.csv", "raw_data", "not_csv.csv, row 1: not valid UTF-8: byte 0x89 at offset 0",
                 id="not-csv-at-all"),
]


@pytest.mark.parametrize(("name", "asset", "message"), ERRORS)
def test_unreadable_input_fails_with_an_error_that_names_the_place(
        tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path, name: str, asset: str,
        message: str) -> None:
    result, _, data_dir = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(BAD / name))
    assert not result.success
    error = step_error(result, asset)
    assert "pipelines.core.errors.SourceError" in error and message in error, error
    assert_no_training(result, data_dir)


def failed_check(result: dg.ExecuteInProcessResult, asset: str, check: str) -> dg.AssetCheckEvaluation:
    evaluations = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    evaluation = evaluations[(asset, check)]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    return evaluation


CHECKS = [
    pytest.param(local(BAD / "all_null_labels.csv"), "cleaned_dataset", "row_count_within_bounds",
                 "expect_table_row_count_to_be_between", id="all-null-labels"),
    pytest.param(local(BAD / "single_class.csv"), "cleaned_dataset", "classes_are_balanced",
                 "expect_column_unique_value_count_to_be_between", id="single-class"),
    pytest.param(local(BAD / "only_duplicates.csv"), "cleaned_dataset", "row_count_within_bounds",
                 "expect_table_row_count_to_be_between", id="only-duplicates"),
    pytest.param(local(BAD / "label_typo.csv"), "cleaned_dataset", "labels_are_known",
                 "expect_column_values_to_be_in_set", id="label-typo"),
    pytest.param(local(BAD / "leaky_splits", split_files={"train": "train.csv", "test": "test.csv"}), "splits",
                 "splits_do_not_overlap", "expect_column_values_to_be_between", id="leaky-source-splits"),
    pytest.param("huge", "cleaned_dataset", "row_count_within_bounds", "expect_table_row_count_to_be_between",
                 id="5mb-single-row"),
]


@pytest.mark.parametrize(("source", "asset", "check", "expectation"), CHECKS)
def test_bad_data_fails_a_blocking_check_and_training_never_starts(
        tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path, source: Any, asset: str,
        check: str, expectation: str) -> None:
    if source == "huge":
        source = local(huge_row_csv(tmp_path / "huge.csv"))
    result, instance, data_dir = run_pipeline(tmp_path, write_spec, tiny_model_dir, source)
    evaluation = failed_check(result, asset, check)
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    assert expectation in metadata["failed_expectations"]
    assert metadata["to_fix"]
    assert evaluation.description.startswith(f"{check} failed: {expectation}(")
    gx_file = Path(str(metadata["gx_validation_result"]))
    assert gx_file == data_dir / "assets" / "gate" / f"{asset}.gx_validation.json"
    assert json.loads(gx_file.read_text())["asset"] == asset
    assert_no_training(result, data_dir)
    # The check result is stored in the instance, where the UI reads it.
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey(["gate", asset]), check)])[dg.AssetCheckKey(dg.AssetKey(["gate", asset]), check)]
    assert record.status.value == "FAILED"


def test_label_typo_names_the_offending_row(tmp_path: Path, write_spec: Callable[..., Path],
                                            tiny_model_dir: Path) -> None:
    result, _, _ = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(BAD / "label_typo.csv"))
    evaluation = failed_check(result, "cleaned_dataset", "labels_are_known")
    rows = str(evaluation.metadata["offending_rows"].value)
    assert "| Where is the town of Halden ? | L0C |" in rows and "label_typo.csv | 9 |" in rows
    assert evaluation.metadata["offending_row_count"].value == 1


def test_leaky_splits_show_up_to_20_offending_rows(tmp_path: Path, write_spec: Callable[..., Path],
                                                   tiny_model_dir: Path) -> None:
    source = local(BAD / "leaky_splits", split_files={"train": "train.csv", "test": "test.csv"})
    result, _, _ = run_pipeline(tmp_path, write_spec, tiny_model_dir, source)
    evaluation = failed_check(result, "splits", "splits_do_not_overlap")
    assert evaluation.metadata["offending_row_count"].value == 180  # 90 texts, each in train and in test
    table = str(evaluation.metadata["offending_rows"].value).splitlines()
    assert len(table) == 2 + 20  # header, rule, 20 rows


def test_good_data_goes_through_every_check(tmp_path: Path, write_spec: Callable[..., Path],
                                            tiny_model_dir: Path) -> None:
    result, _, data_dir = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(BAD / "good.csv"))
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    blocking = [e for e in evaluations if e.blocking]
    assert len(blocking) == 15 and all(e.passed for e in blocking)
    # Plus the data doctor, which only warns (here about the tiny random model's look-alike embeddings).
    assert [e.check_name for e in evaluations if not e.blocking] == ["labels_look_right"]
    assert {"finetuned_checkpoint", "evaluation_report"} <= materialized(result)
    assert (data_dir / "checkpoints" / "gate").is_dir()


def test_imbalance_slightly_over_is_a_warning_that_does_not_block(
        tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path) -> None:
    rows = (BAD / "good.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    # Keep 60 LOC, HUM and NUM rows but only 20 DESC rows: ratio 3, over 2.5 (warning) but under 5 (error).
    kept = [r for r in body if not r.endswith(",DESC")] + [r for r in body if r.endswith(",DESC")][:20]
    path = tmp_path / "imbalanced.csv"
    path.write_text("\n".join([header, *kept]) + "\n")
    result, _, _ = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(path),
                                task={"max_imbalance_ratio": 2.5, "imbalance_error_factor": 2.0})
    evaluation = {e.check_name: e for e in result.get_asset_check_evaluations()}["classes_are_balanced"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert result.success and "finetuned_checkpoint" in materialized(result)


def test_the_data_doctor_warns_about_label_suspects_and_training_goes_on(
        tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path) -> None:
    rows = (BAD / "good.csv").read_text().splitlines()
    flipped = [i for i, row in enumerate(rows) if row.endswith(",LOC")][:6]  # "Where is the town of ...": NUM
    for i in flipped:
        rows[i] = rows[i][:-len("LOC")] + "NUM"
    path = tmp_path / "flipped.csv"
    path.write_text("\n".join(rows) + "\n")
    result, instance, data_dir = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(path),
                                              doctor={"max_suspect_fraction": 0.0})
    evaluation = {e.check_name: e for e in result.get_asset_check_evaluations()}["labels_look_right"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert result.success and "finetuned_checkpoint" in materialized(result)  # it warns, it never blocks
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta["label_suspects"] > 0 and meta["rows"] == 240 and meta["encoder"] == "tiny-bert"
    assert "| # | split | text | given | suggested | confidence | source |" in meta["top_label_suspects"]
    assert "flipped.csv:" in meta["top_label_suspects"]  # each suspect names the file and row it came from
    suspects = Path(meta["label_suspects_csv"])
    # The tiny model's random weights find few of the flips (tests/core/test_doctor.py measures that); the
    # wiring is what is checked here: every suspect row is a row of the file, with its label as given there.
    table = pd.read_csv(suspects)
    source = pd.read_csv(path)
    for _, suspect in table.iterrows():
        assert source.at[int(suspect["source_row"]) - 2, "label"] == suspect["given_label"]  # header = row 1
    assert suspects.parent.parent == data_dir / "assets" / "gate" / "doctor"
    assert len(suspects.read_text().splitlines()) == meta["label_suspects"] + 1
    assert "validation macro_f1" in meta["learning_curve"]


def test_a_doctor_that_cannot_run_warns_and_the_run_goes_on(
        tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path) -> None:
    result, _, _ = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(BAD / "good.csv"),
                                doctor={"model": {"source": "local", "path": str(tmp_path / "no-such-model")}})
    evaluation = {e.check_name: e for e in result.get_asset_check_evaluations()}["labels_look_right"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.description.startswith(
        "the data doctor could not run: ModelSourceError: task.doctor.model: path:")
    assert result.success and "evaluation_report" in materialized(result)


def test_the_doctor_can_be_turned_off(tmp_path: Path, write_spec: Callable[..., Path], tiny_model_dir: Path) -> None:
    result, _, _ = run_pipeline(tmp_path, write_spec, tiny_model_dir, local(BAD / "good.csv"),
                                doctor={"enabled": False})
    assert "labels_look_right" not in {e.check_name for e in result.get_asset_check_evaluations()}
    assert result.success
