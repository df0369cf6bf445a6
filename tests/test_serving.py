"""The champion outside tuneline: registered versions are MLflow Models that MLflow's own tools load and serve."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from pipelines.core.serving import input_texts
from resources.tracking import TrackingResource
from tests.conftest import PROJECT_ROOT, tiny_spec, write_trec_slice
from tests.resources.test_tracking import materialize
from tests.servers import free_port, start, stop, wait_until_up

TEXTS = ["How far is the Moon from the Earth ?", "Who wrote Hamlet ?", "What is the capital of Peru ?"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, trec_lines: list[str], tiny_model_dir: Path) -> tuple[Path, str]:
    """A tiny pipeline materialized once for the module, its version 1 made champion; its data folder and MLflow
    tracking URI."""
    root = tmp_path_factory.mktemp("serving")
    specs = root / "specs"
    specs.mkdir()
    spec = tiny_spec(write_trec_slice(root, trec_lines), tiny_model_dir)
    (specs / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    data_dir = root / "data"
    assert materialize(specs, data_dir, dg.DagsterInstance.ephemeral()).success
    tracking = TrackingResource(data_dir=str(data_dir))
    if tracking.champion("tiny") is None:
        tracking.promote("tiny", "1", "test setup")
    return data_dir, tracking.tracking_uri()


def tuneline_predict(data_dir: Path, *texts: str) -> list[dict[str, object]]:
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "--json",
                          "--data-dir", str(data_dir), *texts], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [{k: v for k, v in row.items() if k != "model"} for row in json.loads(out.stdout)]


def test_the_champion_is_an_mlflow_model_that_pyfunc_loads_and_that_moves_to_another_machine(
        trained: tuple[Path, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    data_dir, uri = trained
    expected = tuneline_predict(data_dir, *TEXTS)
    # In a fresh process with only MLflow's API (the base model's own folder renamed away: the registered model
    # carries its copy), from a folder outside the project.
    moved = tiny_model_dir.with_name(tiny_model_dir.name + "-moved")
    code = ("import json, sys, mlflow\n"
            "mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])\n"
            "model = mlflow.pyfunc.load_model('models:/tiny@champion')\n"
            "frame = model.predict(__import__('pandas').DataFrame({'text': json.loads(sys.argv[2])}))\n"
            "print(json.dumps({'rows': frame.to_dict('records'), 'meta': model.metadata.metadata,"
            " 'inputs': model.metadata.get_input_schema().input_names(),"
            " 'outputs': model.metadata.get_output_schema().input_names()}))\n")
    shutil.move(tiny_model_dir, moved)
    try:
        out = subprocess.run([sys.executable, "-c", code, uri, json.dumps(TEXTS)], cwd=tmp_path,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                             capture_output=True, text=True, timeout=600)
    finally:
        shutil.move(moved, tiny_model_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["rows"] == expected  # same labels and probabilities as `tuneline predict`
    assert loaded["inputs"] == ["text"] and loaded["outputs"] == ["label", "probability", "text"]
    assert loaded["meta"]["tuneline.task"] == "text_classification"
    # The version records what it needs to be rebuilt elsewhere: pinned requirements, tuneline's code, an example.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("tiny", "champion")
    folder = Path(client.download_artifacts(version.run_id, "model", str(tmp_path / "download")))
    requirements = (folder / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and all("==" in r for r in requirements)
    assert (folder / "code" / "pipelines" / "core" / "serving.py").is_file()
    assert json.loads((folder / "serving_input_example.json").read_text())["dataframe_split"]["columns"] == ["text"]


def test_mlflow_models_serve_answers_invocations_as_tuneline_predict_does(trained: tuple[Path, str],
                                                                          tmp_path: Path) -> None:
    data_dir, uri = trained
    expected = tuneline_predict(data_dir, *TEXTS)
    port = free_port()
    log = tmp_path / "serve.log"
    # MLflow starts uvicorn by name: the virtualenv's bin folder must be on PATH, as in an activated environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = start([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/tiny@champion",
                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], log, env=env, cwd=tmp_path)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log, timeout=300)
        body = json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            rows = json.loads(answer.read())["predictions"]
        assert rows == expected
        # A request with no text is refused with a message naming the row, not answered with a guess.
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"inputs": [TEXTS[0], ""]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=120)
        assert "row 1" in refused.value.read().decode()
    finally:
        stop(server)


@pytest.mark.parametrize(("request_rows", "texts"), [
    (pd.DataFrame({"text": ["a", "b"]}), ["a", "b"]),
    (pd.DataFrame({"question": ["a"]}), ["a"]),  # one column, whatever its name
    (["a", "b"], ["a", "b"]),
    ([{"text": "a"}], ["a"]),
    ("a", ["a"]),
])
def test_a_request_reads_as_texts(request_rows: object, texts: list[str]) -> None:
    assert input_texts(request_rows) == texts


@pytest.mark.parametrize(("request_rows", "message"), [
    (pd.DataFrame({"a": ["x"], "b": ["y"]}), "expected a column 'text', got columns ['a', 'b']"),
    (["ok", "  "], "row 1: expected a non-empty string in 'text', got '  '"),
    ([{"text": None}], "row 0: expected a non-empty string in 'text', got None"),
])
def test_a_request_without_texts_is_refused_by_row(request_rows: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        input_texts(request_rows)


def test_tuneline_serve_starts_the_champion_for_the_registry_in_use(trained: tuple[Path, str], tmp_path: Path) -> None:
    data_dir, _ = trained
    expected = tuneline_predict(data_dir, *TEXTS[:2])
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # tuneline tells MLflow where to look
    server = start([sys.executable, "-m", "pipelines.cli", "serve", "--pipeline", "tiny", "--data-dir", str(data_dir),
                    "--port", str(port)], log, env=env, cwd=PROJECT_ROOT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log, timeout=300)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": TEXTS[:2]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert json.loads(answer.read())["predictions"] == expected
        assert "serving tiny v1 (champion) at http://127.0.0.1:" in log.read_text()
    finally:
        stop(server)


def test_tuneline_serve_without_a_champion_says_what_to_do(trained: tuple[Path, str], tmp_path: Path) -> None:
    empty = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--pipeline", "tiny", "--data-dir",
                            str(tmp_path / "data")], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2
    assert "pipeline 'tiny' has no champion in the model registry at sqlite:///" in empty.stderr
    assert "run `tuneline run --pipeline tiny` first" in empty.stderr
    data_dir, _ = trained
    missing = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--pipeline", "tiny", "--version", "9",
                              "--data-dir", str(data_dir)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "has no version 9 of 'tiny'" in missing.stderr


def test_a_version_registered_as_a_plain_checkpoint_folder_still_predicts_but_is_not_served(
        trained: tuple[Path, str], tmp_path: Path) -> None:
    """Versions of earlier releases point at the run's `checkpoint` folder (no MLmodel, no bundled base model)."""
    from mlflow import MlflowClient

    data_dir, uri = trained
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1 = client.get_model_version("tiny", "1")
    bundle = Path(client.download_artifacts(v1.run_id, "model", str(tmp_path / "v1")))
    with client_run(client, client.get_run(v1.run_id).info.experiment_id) as run_id:
        client.log_artifacts(run_id, str(bundle / "artifacts" / "checkpoint"), "checkpoint")
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/checkpoint"
        legacy = client.create_model_version("tiny", source=source, run_id=run_id).version
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--pipeline", "tiny", "--json",
                          "--version", str(legacy), "--data-dir", str(data_dir), *TEXTS], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [{k: v for k, v in r.items() if k != "model"} for r in json.loads(out.stdout)] == tuneline_predict(
        data_dir, *TEXTS)  # the same weights as v1
    refused = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--pipeline", "tiny", "--version",
                              str(legacy), "--data-dir", str(data_dir)], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    assert f"v{legacy} of 'tiny' was registered as a plain checkpoint folder" in refused.stderr
    assert f"`tuneline predict --version {legacy}` answers with it" in refused.stderr


@contextlib.contextmanager
def client_run(client: Any, experiment_id: str) -> Iterator[str]:
    run = client.create_run(experiment_id)
    try:
        yield run.info.run_id
    finally:
        client.set_terminated(run.info.run_id)


def test_onnx_export_answers_as_the_registered_model_and_is_checked_before_it_appears(
        trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import main
    from pipelines.core.tasks.classification import export as onnx_export

    data_dir, _ = trained
    out = tmp_path / "onnx"
    assert main(["export", "--pipeline", "tiny", "--format", "onnx", "--output", str(out),
                 "--data-dir", str(data_dir)]) == 0
    session, tokenizer, manifest = onnx_export.onnx_classifier(out)
    probabilities = onnx_export.onnx_predict(session, tokenizer, TEXTS, manifest["max_length"])
    expected = tuneline_predict(data_dir, *TEXTS)
    assert [manifest["labels"][i] for i in probabilities.argmax(axis=1)] == [row["label"] for row in expected]
    # tuneline predict prints probabilities to 4 decimals: equal within the tolerance plus that rounding
    assert probabilities.max(axis=1) == pytest.approx([row["probability"] for row in expected], abs=1.5e-4)
    parity = manifest["parity"]
    assert parity["labels_match"] and parity["max_probability_difference"] <= 1e-4 and parity["texts"] >= 8
    assert manifest["inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
    # A format the task does not have is refused by name; an export over an existing folder is refused.
    assert main(["export", "--pipeline", "tiny", "--format", "merged", "--output", str(tmp_path / "m"),
                 "--data-dir", str(data_dir)]) == 2
    assert main(["export", "--pipeline", "tiny", "--output", str(out), "--data-dir", str(data_dir)]) == 2
    # An export that does not answer as the checkpoint does leaves nothing behind.
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", -1.0)
    failed = tmp_path / "failed"
    assert main(["export", "--pipeline", "tiny", "--output", str(failed), "--data-dir", str(data_dir)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_export_formats_are_named_in_the_error(trained: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    data_dir, _ = trained
    assert main(["export", "--pipeline", "tiny", "--format", "gguf", "--output", "/nonexistent/x",
                 "--data-dir", str(data_dir)]) == 2
    assert "--format gguf does not fit tiny, a text_classification pipeline: use onnx" in capsys.readouterr().err
