"""A task type is one package: a small one that lives in the tests (text regression, tests/tasks/regression/) is
registered here and runs through the whole graph (raw_data -> evaluation_report), its checks, the registry, `init`
and `predict`, with nothing outside its folder written for it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from pipelines.cli import main as cli
from pipelines.core.errors import SpecError
from pipelines.core.spec import parse_spec
from pipelines.core.tasks import declarations, register, task_named, unregister
from pipelines.definitions import build_definitions, resources_for
from pipelines.init_spec import init_spec
from tests.tasks.regression import TASK

SPEC = "source: {kind: local, path: x.csv}\nbase_model: {model: {source: hub, name: m}}\n"


@pytest.fixture
def regression() -> Iterator[None]:
    register(TASK)
    try:
        yield
    finally:
        unregister(TASK.name)


def test_a_spec_may_name_a_task_type_only_once_it_is_registered(regression: None) -> None:
    spec = parse_spec(SPEC + "task: {type: text_regression, target_column: score, ridge: 0.5}\n", name="r",
                      origin="r.yaml")
    assert (spec.task.type, spec.task.target_column, spec.task.ridge) == ("text_regression", "score", 0.5)
    assert spec.evaluation.primary_metric == "r2" and spec.evaluation.baselines == ("mean_target",)
    with pytest.raises(SpecError, match="task.label_column: a setting of task.type text_classification"):
        parse_spec(SPEC + "task: {type: text_regression, label_column: y}\n", name="r", origin="r.yaml")
    unregister(TASK.name)
    assert TASK.name not in declarations()
    with pytest.raises(SpecError, match="task.type must be one of 'text_classification', 'instruction_tuning'"):
        parse_spec(SPEC + "task: {type: text_regression}\n", name="r", origin="r.yaml")
    register(TASK)
    assert task_named(TASK.name).name == TASK.name


def targets_csv(trec_slice_csv: Path, path: Path) -> Path:
    """TREC questions with a number to learn: the question's length in words, plus a fraction from its characters
    (so that the targets are many distinct numbers, not a few labels)."""
    frame = pd.read_csv(trec_slice_csv)
    scores = [len(q.split()) + sum(map(ord, q)) % 100 / 100 for q in frame["question"]]
    pd.DataFrame({"question": frame["question"], "score": scores}).to_csv(path, index=False)
    return path


def regression_spec(data: Path, model_dir: Path) -> dict[str, object]:
    return {"source": {"kind": "local", "path": str(data)},
            "task": {"type": "text_regression", "text_column": "question", "target_column": "score", "ridge": 0.1},
            "splits": {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3},
            "quality": {"min_rows": 50, "split_tolerance": 0.1},
            "base_model": {"model": {"source": "local", "path": str(model_dir), "name": "tiny-bert"}},
            "training": {"max_length": 32, "precision": "fp32"}}


def test_a_task_type_registered_from_the_tests_runs_through_the_whole_graph(
        regression: None, tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
        write_spec: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = targets_csv(trec_slice_csv, tmp_path / "scores.csv")
    specs = write_spec("lengths", regression_spec(data, tiny_model_dir))
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("lengths_job").execute_in_process(instance=instance)
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {f"lengths/{n}" for n in ("raw_data", "cleaned_dataset", "splits", "base_model",
                                                     "finetuned_checkpoint", "evaluation_report")}
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"targets_are_numbers": True, "row_count_within_bounds": True, "splits_do_not_overlap": True,
                      "split_proportions_match_spec": True, "every_class_in_train_and_test": True,
                      "validation_and_test_are_not_empty": True}  # the task's checks; no data doctor

    report = json.loads(Path(result.output_for_node("lengths__evaluation_report").json_path).read_text())
    assert report["task"] == "text_regression" and report["metric_names"] == ["r2", "rmse", "mae"]
    assert set(report["baselines"]) == {"mean_target"} and report["primary_metric"] == "r2"
    assert report["metrics"]["rmse"] > 0 and report["promotion"]["promote"] == report["beats_baselines"]["mean_target"]
    event = instance.get_latest_materialization_event(dg.AssetKey(["lengths", "finetuned_checkpoint"]))
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}  # type: ignore[union-attr]
    assert meta["ridge"] == 0.1 and meta["trainer"] == "ridge regression (numpy)"  # the task's own data

    capsys.readouterr()  # the registered version answers through the task's own predict and prediction line
    assert cli(["predict", "--pipeline", "lengths", "--data-dir", str(data_dir), "--version", "1",
                "What is the capital of France ?"]) == 0
    value, text = capsys.readouterr().out.strip().split("\t")
    assert math.isfinite(float(value)) and text == "What is the capital of France ?"


def test_init_proposes_a_registered_task_type_from_its_own_starter(
        regression: None, tmp_path: Path, trec_slice_csv: Path) -> None:
    data = targets_csv(trec_slice_csv, tmp_path / "scores.csv")
    pd.read_csv(data).rename(columns={"score": "target"}).to_csv(data, index=False)
    out = init_spec(data, specs_dir=tmp_path / "specs")
    assert out.spec.task.type == "text_regression"
    assert (out.spec.task.text_column, out.spec.task.target_column) == ("question", "target")
    assert set(out.counts) == {"low", "mid", "high"}  # the task's split groups
    text = out.path.read_text()
    assert "The target column holds numbers" in text and "the target column is 'target'" in out.checklist
