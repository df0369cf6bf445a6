"""Training through a launcher: torchrun started through Dagster Pipes, with 2 gloo processes (DDP), trains what
one process trains with the same global batch, for both task types; logs and metrics stream back into the run
and MLflow, and rank 0 alone writes the checkpoint. The Kubernetes launcher's pod is built and checked here (no
cluster runs in CI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from pipelines.core.records import CheckpointRecord
from pipelines.core.spec import PipelineSpec
from pipelines.core.steps import read_raw_data, split_dataset
from pipelines.core.tasks import task_for
from pipelines.definitions import build_definitions, resources_for
from tests.assets.test_instruct import chat_spec
from tests.conftest import tiny_spec
from tests.tiny_chat import tiny_chat_pairs, write_pairs_jsonl, write_tiny_chat_model

# Same rows per step, same order, same initial weights: the two runs differ only in the order floating-point sums
# are taken (a batch's gradient summed over 2 processes by gloo). Measured: at most ~2e-6 on these models.
LOSS_TOLERANCE = 1e-4
EVAL_LOSS_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """The tiny test BERT without dropout: dropout masks are drawn per process, so with dropout a 2-process step
    cannot equal a 1-process step bit for bit (only in distribution)."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test BERT\n", encoding="utf-8")
    return folder


def _trim_train_split(spec_dict: dict[str, Any], source: Path, text_column: str, batch_size: int) -> None:
    """Drop train rows from the source file until the train split is a multiple of `batch_size`. (With a partial
    last batch, accelerate fills the second process's batch with rows from the epoch's start, so that step differs
    from one process's smaller batch; every other step is the same.)"""
    spec = PipelineSpec.model_validate({"name": "trim", **spec_dict})
    raw = read_raw_data(spec, source.parent)[0]
    splits = split_dataset(task_for(spec).clean(raw, spec)[0], spec)[0]
    train = splits[splits["split"] == "train"]
    extra = len(train) % batch_size
    if not extra:
        return
    drop = set(raw.loc[raw["source_row"].isin(train["source_row"].iloc[:extra]), text_column])
    if source.suffix == ".csv":
        frame = pd.read_csv(source)
        frame[~frame[text_column].isin(drop)].to_csv(source, index=False)
    else:
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
        source.write_text("".join(json.dumps(r) + "\n" for r in rows if r[text_column] not in drop), encoding="utf-8")


def _materialize(tmp: Path, name: str,
                 spec_dict: dict[str, Any]) -> tuple[dg.ExecuteInProcessResult, Path, list[str]]:
    """Materialize the spec's job; its result, data folder and the run's log lines."""
    folder = tmp / name
    (folder / "specs").mkdir(parents=True)
    (folder / "specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False), encoding="utf-8")
    data_dir = folder / "data"
    defs = build_definitions(specs_dir=folder / "specs", data_dir=data_dir,
                             resources=resources_for(data_dir, num_threads=2))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(f"{name}_job").execute_in_process(instance=instance, raise_on_error=False)
    failures = [e.message for e in result.all_events if e.is_failure]
    assert result.success, failures
    return result, data_dir, [e.user_message for e in instance.all_logs(result.run_id)]


def _losses(record: CheckpointRecord, key: str) -> list[float]:
    return [entry[key] for entry in record.history if key in entry]


def _mlflow_losses(data_dir: Path, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    from resources.tracking import TrackingResource

    client = MlflowClient(TrackingResource(data_dir=str(data_dir)).tracking_uri())
    return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


CASES = {
    "classification": dict(text_column="question", batch_size=16),
    "instruction": dict(text_column="instruction", batch_size=8),
}


def _case_spec(case: str, tmp: Path, bert: Path, trec_csv: Path) -> tuple[dict[str, Any], Path]:
    if case == "classification":
        source = tmp / "questions.csv"
        shutil.copy(trec_csv, source)
        spec = tiny_spec(source, bert, training={"epochs": 2, "batch_size": 16, "learning_rate": 5e-3,
                                                 "max_length": 32, "precision": "fp32", "logging_steps": 1,
                                                 "head_dropout": 0.0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
        return spec, source
    source = write_pairs_jsonl(tmp / "pairs.jsonl", tiny_chat_pairs())
    model = write_tiny_chat_model(tmp / "tiny-chat")
    spec = chat_spec(source, model)  # the instruction pipeline's test spec, without dropout and with 2 epochs
    spec["training"] = {**spec["training"], "epochs": 2, "logging_steps": 1,
                        "lora": {**spec["training"]["lora"], "dropout": 0.0}}
    spec["task"] = {**spec["task"], "max_new_tokens": 4, "sample_generations": 2}
    spec["evaluation"] = {"baselines": []}
    return spec, source


@pytest.mark.fault
@pytest.mark.parametrize("case", list(CASES))
def test_torchrun_with_two_processes_trains_what_one_process_trains(case: str, tmp_path: Path, no_dropout_bert: Path,
                                                                    trec_slice_csv: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNELINE_TRACKING_URI", raising=False)
    spec, source = _case_spec(case, tmp_path, no_dropout_bert, trec_slice_csv)
    _trim_train_split(spec, source, CASES[case]["text_column"], CASES[case]["batch_size"])

    one, _, _ = _materialize(tmp_path, "single", spec)
    two, two_dir, logs = _materialize(tmp_path, "ddp", {**spec, "compute": {"launcher": "torchrun", "processes": 2}})
    single: CheckpointRecord = one.output_for_node("single__finetuned_checkpoint")
    ddp: CheckpointRecord = two.output_for_node("ddp__finetuned_checkpoint")

    # The same optimisation: every step's training loss, and the validation loss of every epoch.
    assert len(_losses(ddp, "loss")) == len(_losses(single, "loss")) > 10
    assert _losses(ddp, "loss") == pytest.approx(_losses(single, "loss"), abs=LOSS_TOLERANCE)
    for metric in ("eval_accuracy", "eval_macro_f1"):  # from the predictions gathered over both processes
        assert _losses(ddp, metric) == _losses(single, metric)
    # The validation loss is a mean of per-batch means; split over 2 processes the batches differ at the edge.
    assert _losses(ddp, "eval_loss") == pytest.approx(_losses(single, "eval_loss"), rel=EVAL_LOSS_TOLERANCE)
    assert ddp.best_epoch == single.best_epoch and ddp.train_rows == single.train_rows

    # Rank 0's progress lines reached the run's log; its metrics reached the asset's MLflow run as they came.
    assert any(line.startswith("rank 0 of 2: cpu") for line in logs)
    assert any(line.startswith("epoch 2.00: validation") for line in logs)
    assert _mlflow_losses(two_dir, _tracking_run_id(two, "finetuned_checkpoint")) == pytest.approx(
        _losses(ddp, "loss"), abs=1e-6)

    # Rank 0 alone wrote a checkpoint; the data file handed to the processes is gone.
    assert [p.name for p in (two_dir / "checkpoints" / "ddp").iterdir()] == [two.run_id]
    assert not any((two_dir / "launch").rglob("*.parquet"))


def _tracking_run_id(result: dg.ExecuteInProcessResult, asset: str) -> str:
    for event in result.get_asset_materialization_events():
        if event.asset_key.path[-1] == asset:
            return str(event.materialization.metadata["mlflow_run_id"].value)
    raise AssertionError(f"no materialization of {asset}")


@pytest.mark.fault
def test_a_user_error_in_the_launched_training_comes_back_in_its_own_words(tmp_path: Path, tiny_model_dir: Path,
                                                                           trec_slice_csv: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The training process raises (its checkpoint folder exists already): the step fails with that message, not
    only "the process exited with code 1", and nothing is overwritten."""
    import uuid

    monkeypatch.delenv("TUNELINE_TRACKING_URI", raising=False)
    spec = tiny_spec(trec_slice_csv, tiny_model_dir, training={"epochs": 1}, compute={"launcher": "torchrun"})
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "crash.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    data_dir = tmp_path / "data"
    run_id = str(uuid.uuid4())
    taken = data_dir / "checkpoints" / "crash" / run_id
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("someone else's", encoding="utf-8")
    defs = build_definitions(specs_dir=tmp_path / "specs", data_dir=data_dir,
                             resources=resources_for(data_dir, num_threads=2))
    result = defs.resolve_job_def("crash_job").execute_in_process(instance=dg.DagsterInstance.ephemeral(),
                                                                  run_id=run_id, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "crash__finetuned_checkpoint"
    message = failure.step_failure_data.error.message
    assert "training (torchrun) failed" in message and "is never overwritten" in message, message
    assert (taken / "keep.txt").read_text(encoding="utf-8") == "someone else's"
    assert not any((data_dir / "launch").rglob("*.parquet"))


@pytest.mark.parametrize("reaped", [True, False])
def test_a_worker_stops_when_the_process_that_launched_it_is_killed(reaped: bool) -> None:
    """A Dagster step killed mid-training (out of memory, SIGKILL) must not leave its torchrun training running
    beside the retried run: the worker watches the launcher's process id and exits once it is gone (or a zombie)."""
    import signal
    import subprocess
    import sys
    import time

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    worker = subprocess.Popen([sys.executable, "-c", "import time\nfrom pipelines.train_worker import "
                               f"stop_when_launcher_dies\nstop_when_launcher_dies({launcher.pid}, 0.2)\n"
                               "time.sleep(120)"], cwd=Path(__file__).resolve().parent.parent)
    try:
        time.sleep(3)
        assert worker.poll() is None, "the worker stopped while its launcher was alive"
        launcher.send_signal(signal.SIGKILL)
        if reaped:
            launcher.wait()
        assert worker.wait(timeout=30) == 3
    finally:
        for process in (launcher, worker):
            if process.poll() is None:
                process.kill()
        launcher.wait()
