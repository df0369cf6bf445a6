"""MLflow tracking against real stores: runs per materialization, the registry gate, failures, HTTP server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from pipelines.core.evaluation import decide_promotion
from pipelines.core.records import EvaluationReport
from pipelines.definitions import build_definitions, resources_for
from resources.tracking import TrackingResource
from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.servers import free_port, start, stop, wait_until_up

ASSETS = ("raw_data", "cleaned_dataset", "splits", "base_model", "finetuned_checkpoint", "evaluation_report")


def materialize(specs: Path, data_dir: Path, instance: dg.DagsterInstance,
                selection: list[str] | None = None, run_id: str | None = None) -> dg.ExecuteInProcessResult:
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    job = defs.resolve_job_def("tiny_job")
    keys = [dg.AssetKey(["tiny", name]) for name in selection] if selection else None
    return job.execute_in_process(instance=instance, raise_on_error=False, asset_selection=keys, run_id=run_id)


def client_for(data_dir: Path) -> MlflowClient:
    uri = TrackingResource(data_dir=str(data_dir)).tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.parametrize(("candidate", "champion", "promote", "reason"), [
    (0.80, None, True, "first model: macro_f1 0.8000 beats every baseline (majority_class, linear_probe)"),
    (0.60, None, False, "first model but not promoted: macro_f1 0.6000 does not beat linear_probe"),
    (0.80, 0.79, True, "promoted: macro_f1 0.8000 vs champion v1 0.7900 on the same test split, a change of "
                       "+0.0100 (needs at least +0.005, promotion.min_improvement)"),
    (0.80, 0.798, False, "not promoted: macro_f1 0.8000 vs champion v1 0.7980 on the same test split, a change of "
                         "+0.0020 (needs at least +0.005, promotion.min_improvement)"),
    (0.65, 0.60, False, "not promoted: macro_f1 0.6500 does not beat linear_probe (a champion beats every "
                        "baseline)"),
])
def test_promotion_rule(candidate: float, champion: float | None, promote: bool, reason: str) -> None:
    baselines = {"majority_class": {"macro_f1": 0.1}, "linear_probe": {"macro_f1": 0.7}}
    decision = decide_promotion({"macro_f1": candidate}, None if champion is None else {"macro_f1": champion},
                                baselines, "macro_f1", 0.005, "2", None if champion is None else "1")
    assert (decision.promote, decision.reason) == (promote, reason)


def test_two_materializations_track_register_and_gate(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    data_dir = tmp_path / "data"
    instance = dg.DagsterInstance.ephemeral()
    tracking = TrackingResource(data_dir=str(data_dir))

    first = materialize(specs, data_dir, instance)
    assert first.success
    report1: EvaluationReport = first.asset_value(dg.AssetKey(["tiny", "evaluation_report"]))
    client = client_for(data_dir)
    champion = client.get_registered_model("tiny").aliases.get("champion")
    # The first model becomes champion exactly when it beats every baseline.
    beats_all = all(report1.beats_baselines.values())
    assert report1.promotion.promote is beats_all and (str(champion) == "1") is beats_all
    if not beats_all:  # give the second run a champion to face
        tracking.promote("tiny", "1", "test setup")

    second = materialize(specs, data_dir, instance)
    assert second.success
    report2: EvaluationReport = second.asset_value(dg.AssetKey(["tiny", "evaluation_report"]))
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'tiny'"))
    assert versions == [1, 2]
    # Same data, same seed: the candidate equals the champion, so it is not promoted and the alias stays.
    assert report2.champion_metrics == pytest.approx(report2.metrics)
    assert report2.promotion.promote is False
    assert report2.promotion.reason.startswith(f"not promoted: macro_f1 {report2.metrics['macro_f1']:.4f} vs "
                                                  "champion v1")
    assert str(client.get_registered_model("tiny").aliases["champion"]) == "1"
    version2 = client.get_model_version("tiny", "2")
    assert version2.tags["dagster.run_id"] == second.run_id
    checkpoint2 = second.asset_value(dg.AssetKey(["tiny", "finetuned_checkpoint"]))
    assert version2.tags["tuneline.data_sha256"] == checkpoint2.data_sha256
    assert version2.tags["tuneline.checkpoint_sha256"] == checkpoint2.sha256

    # Moving the alias is a compare-and-set on the champion the report compared with: a decision made against
    # "no champion" (or an older one) never overwrites a champion set meanwhile.
    forced = dataclasses.replace(report2, promotion=dataclasses.replace(report2.promotion, promote=True))
    stale = tracking.apply_promotion("tiny", forced, checkpoint2, evaluated_against=None)
    assert stale.promotion.promote is False
    assert stale.promotion.reason.startswith("not promoted: the champion moved to v1 while this run compared itself "
                                             "with no champion")
    assert str(client.get_registered_model("tiny").aliases["champion"]) == "1"
    checkpoint1 = first.asset_value(dg.AssetKey(["tiny", "finetuned_checkpoint"]))
    assert tracking.apply_promotion("tiny", forced, checkpoint2, evaluated_against=checkpoint1).promotion.promote
    assert str(client.get_registered_model("tiny").aliases["champion"]) == "2"
    tracking.promote("tiny", "1", "back to the first, for the checks below")

    # One parent run per Dagster run, one FINISHED child per materialization, with the expected tags.
    experiment = client.get_experiment_by_name("tuneline/tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    for result in (first, second):
        parents = [r for r in runs if r.data.tags.get("dagster.run_id") == result.run_id
                   and r.data.tags.get("tuneline.kind") == "dagster_run"]
        children = [r for r in runs if r.data.tags.get("dagster.run_id") == result.run_id
                    and r.data.tags.get("tuneline.kind") == "asset"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(r.data.tags["dagster.asset_key"] for r in children) == sorted(f"tiny/{a}" for a in ASSETS)
        for run in children:
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert run.data.tags["tuneline.pipeline"] == "tiny"
            assert run.data.tags["dagster.code_version"] and run.data.tags["dagster.data_version"]
        # The materialization metadata names its MLflow run, and the data version matches.
        for event in result.get_asset_materialization_events():
            materialization = event.event_specific_data.materialization
            run_id = materialization.metadata["mlflow_run_id"].value
            run = client.get_run(run_id)
            assert run.data.tags["dagster.asset_key"] == materialization.asset_key.to_user_string()
            assert run.data.tags["dagster.data_version"] == materialization.tags["dagster/data_version"]

    by_asset = {r.data.tags["dagster.asset_key"]: r for r in runs
                if r.data.tags.get("dagster.run_id") == second.run_id and r.data.tags.get("tuneline.kind") == "asset"}
    raw_inputs = by_asset["tiny/raw_data"].inputs.dataset_inputs
    assert raw_inputs[0].dataset.name == "tiny/raw_data" and len(raw_inputs[0].dataset.digest) > 8
    assert {d.dataset.name for d in by_asset["tiny/splits"].inputs.dataset_inputs} == {"tiny/train", "tiny/validation",
                                                                                        "tiny/test"}
    assert by_asset["tiny/base_model"].data.params["base_model.name"] == "tiny-bert"
    train_run = by_asset["tiny/finetuned_checkpoint"]
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) >= 2
    assert {"eval_loss", "eval_accuracy", "tokens_per_second", "peak_memory_mb", "mfu"} <= set(train_run.data.metrics)
    assert 0 < train_run.data.metrics["mfu"] < 1
    assert train_run.data.params["lora.r"] == "4"
    assert train_run.data.params["compute_chosen_by"] == "asked" and train_run.data.params["threads"] == "2"
    # The registered version is an MLflow Model: the checkpoint and a copy of its base model are its artifacts.
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id, "model/artifacts/checkpoint")}
    assert "model/artifacts/checkpoint/head.safetensors" in artifacts
    assert client.get_model_version("tiny", "2").source.endswith("/model")
    eval_run = by_asset["tiny/evaluation_report"]
    assert eval_run.data.metrics["accuracy"] == pytest.approx(report2.metrics["accuracy"])
    assert {a.path for a in client.list_artifacts(eval_run.info.run_id, "report")} == {
        "report/report.json", "report/report.html", "report/confusion_matrix.png", "report/loss_curve.png",
        # the data doctor's findings on the same splits, which the report shows
        "report/label_suspects.csv", "report/near_duplicates.csv", "report/learning_curve.png"}

    # The champion loads back from the registry and predicts.
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "--data-dir",
                          str(data_dir), "--json", "Where is the Eiffel Tower ?"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    [prediction] = json.loads(out.stdout)
    assert prediction["label"] in checkpoint2.task_data["labels"] and 0 < prediction["probability"] <= 1
    assert prediction["model"] == "tiny v1"


def test_training_error_marks_the_run_failed(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                             write_spec: Callable[..., Path]) -> None:
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    data_dir = tmp_path / "data"
    # Training runs, then saving refuses to overwrite the run's checkpoint folder, which is already there.
    run_id = str(uuid.uuid4())
    (data_dir / "checkpoints" / "tiny" / run_id).mkdir(parents=True)
    result = materialize(specs, data_dir, dg.DagsterInstance.ephemeral(), run_id=run_id)
    assert not result.success
    client = client_for(data_dir)
    runs = client.search_runs([client.get_experiment_by_name("tuneline/tiny").experiment_id])
    status = {r.data.tags.get("dagster.asset_key", r.data.tags["tuneline.kind"]): r.info.status for r in runs}
    assert status["tiny/finetuned_checkpoint"] == "FAILED"
    assert status["dagster_run"] == "FAILED"
    assert status["tiny/splits"] == "FINISHED"
    failed = next(r for r in runs if r.data.tags.get("dagster.asset_key") == "tiny/finetuned_checkpoint")
    assert "exists already; a checkpoint folder is never overwritten" in failed.data.tags["tuneline.error"]
    assert client.search_registered_models() == []


@pytest.mark.parametrize(("uri", "message"), [
    ("http://127.0.0.1:{port}", "the MLflow tracking server at http://127.0.0.1:{port} (from $TUNELINE_TRACKING_URI) "
                                "does not answer"),
    ("ftp://example/mlflow", "unsupported MLflow tracking URI 'ftp://example/mlflow' (from $TUNELINE_TRACKING_URI)"),
])
def test_bad_tracking_uri_fails_the_materialization(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch, uri: str, message: str) -> None:
    port = free_port()
    monkeypatch.setenv("TUNELINE_TRACKING_URI", uri.format(port=port))
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
    started = time.monotonic()
    result = materialize(specs, tmp_path / "data", dg.DagsterInstance.ephemeral(), selection=["raw_data"])
    assert time.monotonic() - started < 60  # no minutes of retries
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error
    while error.cause is not None:
        error = error.cause
    assert message.format(port=port) in error.message
    assert not result.get_asset_materialization_events()


@pytest.mark.server
def test_logs_to_a_real_mlflow_server_over_http(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path,
                                                write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = tmp_path / "server.log"
    server = start([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination", str(tmp_path / "server-artifacts")], log)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("TUNELINE_TRACKING_URI", uri)
        specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir))
        result = materialize(specs, tmp_path / "data", dg.DagsterInstance.ephemeral(),
                             selection=["raw_data", "cleaned_dataset", "splits", "base_model"])
        assert result.success
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("tuneline/tiny").experiment_id])
        assets = {r.data.tags.get("dagster.asset_key") for r in runs if r.info.status == "FINISHED"}
        assert {"tiny/raw_data", "tiny/base_model"} <= assets
        event = result.get_asset_materialization_events()[0]
        assert event.event_specific_data.materialization.metadata["mlflow_run"].value.startswith(f"{uri}/#/experiments/")
        assert not (tmp_path / "data" / "mlflow" / "mlflow.db").exists()  # nothing went to the embedded store
    finally:
        stop(server)
    assert server.returncode is not None
