"""The whole graph materialized in-process: tiny BERT built from a config, a slice of TREC, temporary storage."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd

from pipelines.core.records import CheckpointRecord, EvaluationReport
from pipelines.core.digests import frame_digest
from pipelines.definitions import build_definitions, resources_for
from tests.conftest import tiny_spec


def test_materialize_whole_graph(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                 write_spec: Callable[..., Path]) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance)
    assert result.success

    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {f"tiny/{n}" for n in ("raw_data", "cleaned_dataset", "splits", "base_model",
                                                  "finetuned_checkpoint", "evaluation_report")}

    def meta(name: str) -> dict[str, object]:
        event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", name]))
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    raw = meta("raw_data")
    assert raw["dagster/row_count"] == 400 and len(str(raw["sha256"])) == 64
    cleaned = meta("cleaned_dataset")
    assert cleaned["rows_in"] == 400
    assert cleaned["rows_kept"] + cleaned["rows_dropped"] == 400
    assert "| reason | rows |" in str(cleaned["dropped_by_reason"])
    splits = meta("splits")
    assert splits["train_rows"] + splits["validation_rows"] + splits["test_rows"] == cleaned["rows_kept"]
    assert splits["texts_in_several_splits"] == 0
    base = meta("base_model")
    assert base["license"] == "apache-2.0" and base["pooling"] == "mean (from 1_Pooling/config.json)"

    checkpoint: CheckpointRecord = result.asset_value(dg.AssetKey(["tiny", "finetuned_checkpoint"]))
    files = {p.relative_to(checkpoint.path).as_posix() for p in Path(checkpoint.path).rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "head.safetensors", "spec.yaml",
            "history.json", "manifest.json", "loss_curve.png"} <= files
    assert Path(checkpoint.path).parent == data_dir / "checkpoints" / "tiny"
    assert checkpoint.base_model.name == "tiny-bert"
    # The checkpoint names the exact splits it was trained on, by the digest the splits asset reports.
    assert checkpoint.data_sha256 == meta("splits")["sha256"]
    assert checkpoint.data_sha256 == frame_digest(pd.read_parquet(data_dir / "assets" / "tiny" / "splits.parquet"))
    assert meta("finetuned_checkpoint")["data_sha256"] == checkpoint.data_sha256
    manifest = json.loads((Path(checkpoint.path) / "manifest.json").read_text())
    assert manifest["task"] == checkpoint.task == "text_classification"
    assert manifest["task_data"] == checkpoint.task_data == {"labels": sorted(checkpoint.task_data["labels"])}
    assert manifest["weight_files"] == ["adapter/adapter_model.safetensors", "head.safetensors"]
    assert manifest["sha256"] == checkpoint.sha256

    report: EvaluationReport = result.asset_value(dg.AssetKey(["tiny", "evaluation_report"]))
    stored = json.loads(Path(report.json_path).read_text())
    assert stored["metrics"] == report.metrics
    assert set(report.metrics) == {"accuracy", "macro_precision", "macro_recall", "macro_f1",
                                   "weighted_precision", "weighted_recall", "weighted_f1"}
    assert set(report.baselines) == {"majority_class", "linear_probe"}
    assert Path(report.files["confusion_matrix"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in Path(report.html_path).read_text()
    assert sum(map(sum, report.details["confusion_matrix"])) == report.test_rows == splits["test_rows"]
    # The data doctor's findings on the same splits are part of the report: summary, suspects, learning curve.
    doctor = report.details["doctor"]
    assert doctor["model"] == "tiny-bert" and "have a label that looks wrong" in doctor["summary"]
    assert [c["share"] for c in doctor["curve"]] == [0.25, 0.5, 1.0]
    page = Path(report.html_path).read_text()
    assert "Data doctor: " in page and "Learning curve: going from" in page
    assert (Path(report.html_path).parent / "learning_curve.png").is_file()
    # The page stands alone (its pictures inline) and reads top down: verdict, metrics, tables, pictures, lineage.
    assert page.count('src="data:image/png;base64,') == 3  # loss curve, confusion matrix, learning curve
    order = [page.index(s) for s in ('id="metrics"', "Per class", "Sample errors: ", "Training and validation loss",
                                     "Confusion matrix", 'id="lineage"')]
    assert order == sorted(order)
    wrong = int(re.search(r"Sample errors: (\d+) of (\d+) test rows wrong", page).group(1))
    assert wrong == report.test_rows - round(report.metrics["accuracy"] * report.test_rows)
    errors = next(t for t in report.tables if t.title.startswith("Sample errors"))
    assert all(true != predicted for _, true, predicted, _ in errors.rows) and len(errors.rows) == min(wrong, 20)
    assert all(re.fullmatch(r".+:\d+", source) for *_, source in errors.rows)  # the file and row of each
    for value in (checkpoint.data_sha256, checkpoint.base_model.weights_sha256, checkpoint.spec_hash,
                  report.lineage["MLflow run"], "tiny-bert (local folder "):
        assert value in page
    assert json.loads(Path(report.json_path).read_text())["details"]["doctor"] == doctor
    evaluation = meta("evaluation_report")
    assert evaluation["accuracy"] == round(report.metrics["accuracy"], 4)  # four decimals in the UI
    assert "| fine-tuned |" in str(evaluation["report"])
    for key in ("confusion_matrix_image", "loss_curve_image", "learning_curve_image"):  # pictures on the page
        assert str(evaluation[key]).startswith("![") and "(data:image/png;base64," in str(evaluation[key])
    assert "(data:image/png;base64," in str(meta("finetuned_checkpoint")["loss_curve"])
    assert str(evaluation["mlflow_run"]).startswith(("http://", "https://", "file:"))

    # The IO manager stored tables as Parquet, which a person can open without tuneline.
    stored_splits = pd.read_parquet(data_dir / "assets" / "tiny" / "splits.parquet")
    assert set(stored_splits["split"]) == {"train", "validation", "test"}


def test_prompting_baselines_and_the_verdict_sentence(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                                      write_spec: Callable[..., Path]) -> None:
    """A (tiny) instruction-tuned model picks among the label names zero-shot and with one example per class;
    the report says in one sentence whether fine-tuning paid off, with its cost."""
    from tests.tiny_chat import write_tiny_chat_model

    chat = write_tiny_chat_model(tmp_path / "tiny-chat")
    spec = tiny_spec(trec_slice_csv, tiny_model_dir, evaluation={
        "baselines": ["majority_class", "prompting"],
        "prompting": {"model": {"source": "local", "path": str(chat), "name": "tiny-chat"}, "shots": [0, 1]}})
    spec["task"] = {**spec["task"], "label_names": {"LOC": "location", "NUM": "number"}}
    specs = write_spec("tiny", spec)
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    report: EvaluationReport = result.asset_value(dg.AssetKey(["tiny", "evaluation_report"]))
    assert set(report.baselines) == {"majority_class", "prompt_0_shot", "prompt_1_shot"}
    for name in ("prompt_0_shot", "prompt_1_shot"):
        assert set(report.baselines[name]) == set(report.metrics) and 0 <= report.baselines[name]["accuracy"] <= 1
    assert report.verdict.startswith(("Fine-tuning paid off: macro_f1", "Fine-tuning did not pay off: macro_f1"))
    assert "min of training and" in report.verdict and "trainable parameters" in report.verdict
    assert report.verdict in Path(report.html_path).read_text()
    # The prompted answers are kept by what they depend on: evaluating again does not prompt again.
    assert len(list((data_dir / "cache" / "prompting").glob("*.npy"))) == 2
