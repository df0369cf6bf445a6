"""Crash-safe training, proven with a real fault: `tuneline run` is killed with SIGKILL after its first resumable
checkpoint, run again, and must resume (not restart) and end with the same adapter and metrics as a run that was
never interrupted. For both task types; and the MLflow run the killed process left RUNNING is closed as KILLED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.assets.test_instruct import chat_spec
from tests.conftest import PROJECT_ROOT, tiny_spec
from tests.tiny_chat import tiny_chat_pairs, write_pairs_jsonl, write_tiny_chat_model

pytestmark = pytest.mark.fault


def command(pipeline: str, specs: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", "--pipeline", pipeline, "--json", "--specs-dir", str(specs),
            "--data-dir", str(data_dir)]


def environment(home: Path) -> dict[str, str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    env.pop("TUNELINE_TRACKING_URI", None)
    return env


def run_to_the_end(pipeline: str, specs: Path, data_dir: Path, home: Path) -> tuple[dict[str, Any], str]:
    out = subprocess.run(command(pipeline, specs, data_dir), cwd=PROJECT_ROOT, env=environment(home),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr


def signal_after_first_checkpoint(pipeline: str, specs: Path, data_dir: Path, home: Path,
                                  sent: signal.Signals) -> tuple[int, list[str]]:
    """Start the run, send it `sent` as soon as it reports its first resumable checkpoint, and let it end; return
    its exit status and its stderr lines (up to the end of the process, but for SIGKILL)."""
    process = subprocess.Popen(command(pipeline, specs, data_dir), cwd=PROJECT_ROOT, env=environment(home),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line.rstrip("\n"))
        if "saved a resumable checkpoint at step" in line:
            os.kill(process.pid, sent)
            break
    if sent != signal.SIGKILL:  # a killed process's children may still hold the pipe: its end is not awaited
        lines += [line.rstrip("\n") for line in process.stderr]
    process.wait(timeout=60)
    return process.returncode, lines


def kill_after_first_checkpoint(pipeline: str, specs: Path, data_dir: Path, home: Path) -> list[str]:
    """Start the run, SIGKILL it as soon as it reports its first resumable checkpoint; return its stderr lines."""
    status, lines = signal_after_first_checkpoint(pipeline, specs, data_dir, home, signal.SIGKILL)
    assert status == -signal.SIGKILL, "\n".join(lines[-30:])
    return lines


def weights(data_dir: Path, summary: dict[str, Any], files: tuple[str, ...]) -> dict[str, Any]:
    """The saved result of a run: its checkpoint's weight files, tensor by tensor."""
    from safetensors.torch import load_file

    folder = data_dir / "checkpoints" / "resumed" / summary["run_id"]
    return {f"{name}:{key}": tensor for name in files for key, tensor in load_file(str(folder / name)).items()}


def classification_case(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path) -> dict[str, Any]:
    # Batches of 2 over ~280 training rows: about 420 steps, a few seconds on the tiny model, checkpoints every 20.
    # Adapters on the top block only: training reads the lower block's cached outputs, and so does the resumed run.
    return tiny_spec(trec_slice_csv, tiny_model_dir, training={"batch_size": 2, "epochs": 3, "checkpoint_every": 20,
                                                               "logging_steps": 20,
                                                               "lora": {"r": 4, "alpha": 8, "top_layers": 1}})


def instruction_case(tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path) -> dict[str, Any]:
    # The instruction test's spec, in batches of 2: about 170 steps, checkpoints every 20.
    spec = chat_spec(write_pairs_jsonl(tmp_path / "raw" / "pairs.jsonl", tiny_chat_pairs()),
                     write_tiny_chat_model(tmp_path / "tiny-chat"))
    spec["training"] = {**spec["training"], "epochs": 4, "batch_size": 2, "logging_steps": 20, "checkpoint_every": 20}
    return spec


CASES = {
    "classification": (classification_case, ("adapter/adapter_model.safetensors", "head.safetensors")),
    "instruction": (instruction_case, ("adapter/adapter_model.safetensors",)),
}


@pytest.mark.parametrize("task", list(CASES))
def test_a_run_killed_after_a_checkpoint_resumes_and_ends_as_if_never_interrupted(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path],
        task: str) -> None:
    import torch

    make_spec, files = CASES[task]
    specs = write_spec("resumed", make_spec(tmp_path, trec_slice_csv, tiny_model_dir))

    reference, _ = run_to_the_end("resumed", specs, tmp_path / "reference", tmp_path / "home-reference")

    data_dir, home = tmp_path / "crashed", tmp_path / "home-crashed"
    killed = kill_after_first_checkpoint("resumed", specs, data_dir, home)
    saved_at = int(killed[-1].split("saved a resumable checkpoint at step ")[1].split()[0])
    assert not any("kept the weights of epoch" in line for line in killed), "the run ended before the kill"
    [key_folder] = [p for p in (data_dir / "scratch" / "resumed").iterdir() if p.is_dir()]
    assert [p.name for p in key_folder.iterdir() if p.name.startswith("resumable-")] == [f"resumable-{saved_at}"]

    resumed, stderr = run_to_the_end("resumed", specs, data_dir, home)
    assert f"resuming from step {saved_at} of " in stderr and "starting fresh" not in stderr, stderr[-3000:]
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in stderr.splitlines() if " step " in line
             and "finetuned_checkpoint: step " in line]
    assert steps and min(steps) > saved_at, steps  # the steps before the checkpoint were not trained again
    assert "was left RUNNING by process" in stderr  # the killed attempt's MLflow run, closed now
    assert "was left running by process" in stderr  # and its Dagster run, reported failed
    assert not key_folder.exists(), "the scratch checkpoint is removed once the result is saved"

    # Bit-identical on CPU: the Trainer restores weights, optimizer, scheduler, RNG states and the position in the
    # data order, and the best epoch so far comes back from the callback's saved state.
    expected, got = weights(tmp_path / "reference", reference, files), weights(data_dir, resumed, files)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    expected_report = json.loads(Path(reference["report_json"]).read_text())["metrics"]
    assert json.loads(Path(resumed["report_json"]).read_text())["metrics"] == expected_report

    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs_of_job = instance.get_runs(filters=dg.RunsFilter(job_name="resumed_job"))
        assert sorted(r.status.value for r in runs_of_job) == ["FAILURE", "SUCCESS"]

    from resources.tracking import TrackingResource

    client = TrackingResource(data_dir=str(data_dir)).client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    training = {r.info.status for r in runs if r.info.run_name == "finetuned_checkpoint"}
    assert training == {"KILLED", "FINISHED"}
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_run_sent_sigterm_or_sigint_stops_at_once_and_resumes_from_its_checkpoint(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path],
        sent: signal.Signals) -> None:
    """`kill PID` or Ctrl-C during training stops `tuneline run`: the step fails at once, is not retried (Dagster
    retries an interrupted step under a RetryPolicy, which made the run go on after `kill`), the evaluation does
    not start, the exit status says it failed, and the next run resumes from the last resumable checkpoint."""
    import dagster as dg

    spec = classification_case(tmp_path, trec_slice_csv, tiny_model_dir)
    spec["training"] = {**spec["training"], "epochs": 6}  # 850 steps: the signal comes at step 20, long before the end
    specs = write_spec("resumed", spec)
    data_dir, home = tmp_path / "data", tmp_path / "home"
    status, lines = signal_after_first_checkpoint("resumed", specs, data_dir, home, sent)
    text = "\n".join(lines)
    assert status == 1, text[-3000:]
    assert "interrupted (SIGINT or SIGTERM)" in text, text[-3000:]
    assert sum("finetuned_checkpoint: starting fresh" in line for line in lines) == 1, text[-3000:]  # no retry
    assert not any("kept the weights of epoch" in line or "evaluation_report:" in line for line in lines), text[-3000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(filters=dg.RunsFilter(job_name="resumed_job"))
        assert run.status == dg.DagsterRunStatus.FAILURE
        retried = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY).records
        assert not retried

    again = subprocess.run(command("resumed", specs, data_dir), cwd=PROJECT_ROOT, env=environment(home),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finetuned_checkpoint: resuming from step " in again.stderr, again.stderr[-3000:]


def test_a_step_stopped_by_a_signal_is_reported_as_interrupted_not_as_a_dagster_class() -> None:
    """A check (no tracking wrapper) interrupted by SIGTERM fails with Dagster's interrupt error: the terminal says
    what happened in words."""
    from dagster._utils.error import SerializableErrorInfo

    from pipelines.terminal import _user_message

    interrupt = SerializableErrorInfo("dagster._core.errors.DagsterExecutionInterruptedError\n", [],
                                      "DagsterExecutionInterruptedError")
    wrapped = SerializableErrorInfo("dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred\n", [],
                                    "DagsterExecutionStepExecutionError", cause=interrupt)
    assert _user_message(wrapped) == "interrupted (SIGINT or SIGTERM)"
    other = SerializableErrorInfo("ValueError: bad value\n", [], "ValueError")
    assert _user_message(other) == "ValueError: bad value"
