"""Faults while saving: the kernel refuses a write (a file size limit, as a full disk would). The error names the
path and says what to do; nothing partial is left behind, and nothing is registered."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, tiny_spec

pytestmark = pytest.mark.fault
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d [a-z_]+: ")


def file_size_limit(limit: int) -> Callable[[], None]:
    """For a child process: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, so the write returns the
    error instead of killing the process), as a disk that is full would fail them."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


@contextmanager
def limited_here(limit: int) -> Iterator[None]:
    """The same limit on this process, for the duration of the block."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_resumable_checkpoint_that_cannot_be_written_fails_the_run_clearly_and_leaves_nothing(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    # The tiny model's full state is about 4 MB; the run's databases stay under 2 MB, so the save is what fails.
    specs = write_spec("gate", tiny_spec(trec_slice_csv, tiny_model_dir, training={"checkpoint_every": 5}))
    data_dir = tmp_path / "data"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    env.pop("TUNELINE_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--pipeline", "gate", "--specs-dir",
                          str(specs), "--data-dir", str(data_dir)], cwd=PROJECT_ROOT, env=env, capture_output=True,
                         text=True, timeout=600, preexec_fn=file_size_limit(2 * 2**20))
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    block = [line for line in out.stderr.strip().splitlines() if not PROGRESS.match(line)]
    [key_folder] = [p for p in (data_dir / "scratch" / "gate").iterdir() if p.is_dir()]
    assert len(block) == 3, block
    assert block[0] == (f"error: step finetuned_checkpoint failed: could not write a resumable checkpoint to "
                        f"{key_folder}/checkpoint-5: Error while serializing: I/O error: File too large (os error "
                        "27); nothing of it was kept. Free space there, point "
                        "--data-dir at another disk, or set training.checkpoint_every: 0")
    assert block[1] == "not run, because of the failures above: evaluation_report"
    assert list(key_folder.iterdir()) == []  # no half-written checkpoint, nothing that would be resumed
    assert not (data_dir / "checkpoints").exists()

    from resources.tracking import TrackingResource

    client = TrackingResource(data_dir=str(data_dir)).client()
    assert client.search_registered_models() == []  # nothing half-registered


def test_a_checkpoint_that_cannot_be_written_names_its_folder_and_leaves_nothing(tmp_path: Path) -> None:
    from pipelines.core.errors import CheckpointError
    from pipelines.core.training.checkpoints import save_checkpoint

    def write_files(folder: Path) -> None:
        (folder / "adapter.safetensors").write_bytes(b"\0" * (3 * 2**20))

    target = tmp_path / "checkpoints" / "gate" / "run-1"
    manifest = {"weight_files": ["adapter.safetensors"]}
    with limited_here(2**20), pytest.raises(CheckpointError) as info:
        save_checkpoint(target, write_files, manifest, "spec: {}\n", ())
    assert str(info.value) == (f"could not write the checkpoint to {target}: File too large; nothing was kept. Free "
                               "space there or point --data-dir at another disk")
    assert list(target.parent.iterdir()) == []  # neither the folder nor its hidden temporary sibling


@pytest.mark.server
def test_a_tracking_server_that_stops_during_training_fails_the_run_clearly_and_a_rerun_completes(
        tmp_path: Path, trec_slice_csv: Path, tiny_model_dir: Path, write_spec: Callable[..., Path]) -> None:
    import dagster as dg

    from tests.servers import free_port, start, stop, wait_until_up

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_argv = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                   str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                   "--artifacts-destination", str(tmp_path / "server-artifacts")]
    specs = write_spec("gate", tiny_spec(trec_slice_csv, tiny_model_dir, training={
        "batch_size": 2, "epochs": 3, "checkpoint_every": 20, "logging_steps": 20}))
    data_dir, home = tmp_path / "data", tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "TUNELINE_TRACKING_URI": uri}
    argv = [sys.executable, "-m", "pipelines.cli", "run", "--pipeline", "gate", "--specs-dir", str(specs),
            "--data-dir", str(data_dir)]

    server = start(server_argv, tmp_path / "server.log")
    try:
        wait_until_up(f"{uri}/health", server, tmp_path / "server.log")
        run = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        assert run.stderr is not None
        lines = []
        for line in run.stderr:  # stop the server once training has logged its metrics and saved a checkpoint
            lines.append(line.rstrip("\n"))
            if "saved a resumable checkpoint at step 40" in line:
                stop(server)
        run.wait(timeout=300)
    finally:
        stop(server)
    assert run.returncode == 1, "\n".join(lines[-40:])
    assert not any("Traceback" in line for line in lines)
    block = [line for line in lines if not PROGRESS.match(line)]
    assert block[0].startswith(f"error: step finetuned_checkpoint failed: the MLflow tracking server at {uri}"), block
    assert block[1] == "not run, because of the failures above: evaluation_report", block
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [failed] = instance.get_runs()
        retries = instance.all_logs(failed.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
        assert [e.step_key for e in retries] == ["gate__finetuned_checkpoint"] * 2  # outages are retried

    server = start(server_argv, tmp_path / "server-again.log")  # the same store, back on the same port
    try:
        wait_until_up(f"{uri}/health", server, tmp_path / "server-again.log")
        rerun = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "resuming from step 40 of " in rerun.stderr  # the checkpoint saved before the outage
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        [version] = client.search_model_versions("name = 'gate'")  # one version, whole: nothing half-registered
        assert version.status == "READY" and version.tags["dagster.run_id"] != failed.run_id
        experiment = client.get_experiment_by_name("tuneline/gate").experiment_id
        assert not client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    finally:
        stop(server)

