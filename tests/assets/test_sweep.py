"""A sweep materialized for real: Optuna trials in two worker processes sharing an SQLite study, each trial an
MLflow child run, the best settings training finetuned_checkpoint; the test split never read by a trial."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines.core.records import CheckpointRecord
from pipelines.definitions import build_definitions, resources_for
from tests.conftest import tiny_spec

# training.* and the task's own settings (task.*) are searched alike.
SPACE = {"learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "lora.r": {"choices": [2, 4]},
         "epochs": {"low": 1, "high": 2}, "task.label_smoothing": {"choices": [0.0, 0.1]}}


def test_sweep_trials_are_child_runs_and_the_best_settings_train(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNELINE_TRACKING_URI", raising=False)
    specs = write_spec("tiny", tiny_spec(trec_slice_csv, tiny_model_dir, sweep={
        "trials": 4, "parallel": 2, "space": SPACE}))
    data_dir = tmp_path / "data"
    defs = build_definitions(specs_dir=specs, data_dir=data_dir, resources=resources_for(data_dir, num_threads=2))
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert "sweep" in {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    sweep = result.asset_value(dg.AssetKey(["tiny", "sweep"]))
    assert len(sweep.trials) == 4 and {t["trial"] for t in sweep.trials} == {0, 1, 2, 3}
    assert set(sweep.best_params) == set(SPACE)
    # Trial 0 trains the spec's own settings, so the best is at least as good as not sweeping.
    assert sweep.trials[0]["params"] == {"learning_rate": 5e-3, "lora.r": 4, "epochs": 2, "task.label_smoothing": 0.0}
    complete = [t for t in sweep.trials if t["state"] == "complete"]
    assert complete and sweep.best_value == pytest.approx(max(t["value"] for t in complete), abs=1e-4)
    assert Path(sweep.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep.storage.startswith("sqlite:///") and sweep.storage.endswith("sweeps/optuna.db")

    # The best trial's settings trained the checkpoint.
    checkpoint: CheckpointRecord = result.asset_value(dg.AssetKey(["tiny", "finetuned_checkpoint"]))
    trained = [h for h in checkpoint.history if "eval_macro_f1" in h]
    assert len(trained) == sweep.best_params["epochs"]
    trained_spec = yaml.safe_load((Path(checkpoint.path) / "spec.yaml").read_text())
    assert trained_spec["task"]["label_smoothing"] == sweep.best_params["task.label_smoothing"]

    # Each trial is an MLflow child run of the sweep's run, with its settings, per-epoch metrics and duration.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tuneline/tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parent = next(r for r in runs if r.data.tags.get("dagster.asset_key") == "tiny/sweep")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == [0, 1, 2, 3]
    for run in trials:
        assert set(run.data.params) == set(SPACE)
        assert "trial_seconds" in run.data.metrics and "eval_macro_f1" in run.data.metrics
        assert run.info.status in ("FINISHED", "KILLED")
        history = client.get_metric_history(run.info.run_id, "eval_macro_f1")
        assert 1 <= len(history) <= int(run.data.params["epochs"])
    assert parent.data.metrics["best_validation_macro_f1"] == pytest.approx(sweep.best_value, abs=1e-4)
    # No trial read the test split: the data handed to the workers holds train and validation rows only.
    import pandas as pd

    handed = pd.read_parquet(Path(sweep.plot).parent / "data.parquet")
    assert set(handed["split"]) == {"train", "validation"} and len(handed) > 0


def test_a_sweep_setting_that_training_does_not_have_is_refused(tmp_path: Path, trec_slice_csv: Path,
                                                                tiny_model_dir: Path) -> None:
    from pipelines.core.spec import PipelineSpec

    data = tiny_spec(trec_slice_csv, tiny_model_dir, sweep={"space": {"lora.rank": {"choices": [2, 4]}}})
    with pytest.raises(ValueError, match=r"sweep.space.lora.rank: training.lora has no setting 'rank'"):
        PipelineSpec.model_validate({**data, "name": "x"})
    data = tiny_spec(trec_slice_csv, tiny_model_dir, sweep={"space": {"epochs": {"low": 0, "high": 3}}})
    with pytest.raises(ValueError, match=r"sweep.space.epochs: "):
        PipelineSpec.model_validate({**data, "name": "x"})
    data = tiny_spec(trec_slice_csv, tiny_model_dir, sweep={"metric": "rouge_l", "space": {"epochs": {"choices": [1]}}})
    with pytest.raises(ValueError, match=r"sweep.metric 'rouge_l' is not a validation metric"):
        PipelineSpec.model_validate({**data, "name": "x"})
