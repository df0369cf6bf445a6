"""The training command a launcher starts through Dagster Pipes: `python -m pipelines.train_worker`, one process
per rank under torchrun (locally or in a Kubernetes pod).

Every rank reads the job (spec, data file, base model, folders) from the Pipes context and trains its share of
each batch (DDP). Only rank 0 opens the Pipes message channel: its progress lines stream into the Dagster run's
log, its metrics to the asset's MLflow run (through the launching process: the worker needs no tracking
credentials), and it alone writes the checkpoint and reports the result. The other ranks save to a private
temporary folder that is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resources.compute import CHECKPOINT, ERROR, JOB, LAUNCHER_PID, METRICS


def stop_when_launcher_dies(pid: int, interval: float = 2.0) -> None:
    """A daemon thread that ends this process when process `pid` no longer exists (torchrun then stops the other
    ranks). A training orphaned by a killed Dagster step would otherwise go on beside the retried run."""
    import threading
    import time

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists (owned by another user)
            return True
        try:  # a killed process its parent has not reaped yet is a zombie: gone all the same
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def watch() -> None:
        while alive():
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


class PipesMetrics:
    """The metrics sink of rank 0: each log of the Trainer goes to the launching process as a Pipes message."""

    def __init__(self, pipes: Any) -> None:
        self.pipes = pipes

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.pipes.report_custom_message({"kind": METRICS, "metrics": dict(metrics), "step": int(step)})


def _job_from_context() -> dict[str, Any]:
    """The job, read from the Pipes context without opening the message channel (every rank can do this)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        return dict(data["extras"][JOB])


def train(job: dict[str, Any], rank: int, world_size: int, local_rank: int, progress: Any, sink: Any) -> Any:
    """Train the job's spec on its data; rank 0 saves to the job's folder, other ranks to a folder then removed."""
    import pandas as pd
    import torch

    from pipelines.core.records import BaseModelRecord
    from pipelines.core.spec import PipelineSpec
    from pipelines.core.tasks import task_for
    from pipelines.core.hardware import resolve_compute, usable_cores

    spec = PipelineSpec.model_validate(job["spec"])
    compute = resolve_compute(**job["compute"], world_size=world_size)
    if compute.device == "cuda":
        torch.cuda.set_device(local_rank)
    elif compute.num_threads is None and world_size > 1:  # the pod's cores, shared among its processes
        compute = resolve_compute(**{**job["compute"], "num_threads": max(1, usable_cores() // world_size)},
                                  world_size=world_size)
    data = pd.read_parquet(job["data"])
    base = BaseModelRecord.from_dict(job["base_model"])
    if rank == 0:
        progress(f"rank 0 of {world_size}: {compute.device}, {compute.precision}, "
                 f"{compute.num_threads or torch.get_num_threads()} threads per process, "
                 f"{spec.training.batch_size // world_size} rows per process and step")
        if world_size > 1 and (spec.training.checkpoint_steps or spec.training.checkpoint_seconds):
            progress("no resumable checkpoints with several processes (training.checkpoint_every applies to one "
                     "process): after a crash this training starts over")
        return task_for(spec).train(data, base, spec, Path(job["out_dir"]), compute, progress=progress, sink=sink,
                                    scratch=Path(job["scratch"]) if job.get("scratch") else None)
    private = Path(tempfile.mkdtemp(prefix=f"tuneline-rank{rank}-"))
    try:
        return task_for(spec).train(data, base, spec, private / "checkpoint", compute, progress=lambda _: None)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def main() -> None:
    from pipelines.quiet import quiet_libraries

    quiet_libraries()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get(LAUNCHER_PID):
        stop_when_launcher_dies(int(os.environ[LAUNCHER_PID]))
    job = _job_from_context()
    if rank:
        train(job, rank, world_size, local_rank, progress=None, sink=None)
        return

    from dagster_pipes import open_dagster_pipes

    from pipelines.core.errors import TunelineError

    with open_dagster_pipes() as pipes:
        try:
            record = train(job, rank, world_size, local_rank, progress=pipes.log.info, sink=PipesMetrics(pipes))
        except TunelineError as exc:  # a user's problem: its words reach the run, not only a traceback
            pipes.report_custom_message({"kind": ERROR, "type": type(exc).__name__, "message": str(exc)})
            raise
        pipes.report_custom_message({"kind": CHECKPOINT, "record": record.to_dict()})


if __name__ == "__main__":
    main()
