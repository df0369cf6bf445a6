"""Which device and precision training and inference use, and where training runs: in the asset's process
(`local`), as torchrun processes (`torchrun`) or in a Kubernetes pod (`k8s`), the last two through Dagster Pipes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from pipelines.core.errors import TunelineError
from pipelines.core.files import atomic_path
from pipelines.core.hardware import resolve_compute, usable_cores
from pipelines.core.records import BaseModelRecord, CheckpointRecord
from pipelines.core.sections import ComputeConfig, KubernetesLaunchConfig
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.autotune import ComputeChoice
    from pipelines.core.spec import PipelineSpec
    from pipelines.core.tasks import Task

WORKER_MODULE = "pipelines.train_worker"
# The launcher's side of the Pipes exchange with the worker: the key of the job in the extras, the kinds of custom
# message rank 0 sends back, and the variable naming the launching process (when it is gone, training stops).
JOB = "tuneline_training"
METRICS, CHECKPOINT, ERROR = "metrics", "checkpoint", "error"
LAUNCHER_PID = "TUNELINE_LAUNCHER_PID"


class LaunchError(TunelineError):
    """The training command started by a launcher failed; the message says how and where to look."""


# ------------------------------------------------------------------------------------------ launching
def worker_command(compute: ComputeConfig, python: str = sys.executable) -> list[str]:
    """The command that trains: torchrun (as a module of the same Python) with one process per rank on this node."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={compute.processes}",
            "-m", WORKER_MODULE]


def training_pod_spec(pod: KubernetesLaunchConfig) -> dict[str, Any]:
    """The Kubernetes pod spec of a training pod (PipesK8sClient adds the image, command and Pipes variables):
    GPU and CPU/memory resources, the data volume at the path the run pods use, shared memory for the data
    loaders and NCCL, node selector and service account."""
    limits: dict[str, str] = {}
    if pod.gpus:
        limits["nvidia.com/gpu"] = str(pod.gpus)
    if pod.cpu:
        limits["cpu"] = pod.cpu
    if pod.memory:
        limits["memory"] = pod.memory
    container: dict[str, Any] = {
        "name": "training",
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "workingDir": "/opt/tuneline",
    }
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if pod.data_volume_claim:
        container["volumeMounts"].append({"name": "data", "mountPath": pod.data_mount_path})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": pod.data_volume_claim}})
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes, "restartPolicy": "Never"}
    if pod.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.service_account:
        spec["serviceAccountName"] = pod.service_account
    return spec


class _ForwardingHandler:
    """Stands in for Dagster's Pipes message handler: the training's metrics go to the sink as they arrive, its
    result and its error are kept; every other message goes on to Dagster's handler (logs, open, close)."""

    def __init__(self, handler: Any, outcome: LaunchOutcome) -> None:
        self._handler, self._outcome = handler, outcome

    def handle_message(self, message: Mapping[str, Any]) -> None:
        if message.get("method") == "report_custom_message":
            payload = (message.get("params") or {}).get("payload")
            if isinstance(payload, dict) and payload.get("kind") in (METRICS, CHECKPOINT, ERROR):
                self._outcome.receive(payload)
                return
        self._handler.handle_message(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)


class LaunchOutcome:
    """What the training process sent: its checkpoint record or error; metrics are forwarded to `sink` at once."""

    def __init__(self, sink: MetricsSink | None) -> None:
        self.sink = sink
        self.record: CheckpointRecord | None = None
        self.error: dict[str, Any] | None = None
        self.sink_failure: BaseException | None = None
        self._lock = threading.Lock()

    def receive(self, payload: dict[str, Any]) -> None:
        with self._lock:
            if payload["kind"] == METRICS:
                if self.sink is not None and self.sink_failure is None:
                    try:
                        self.sink.log_metrics(payload["metrics"], payload["step"])
                    except Exception as exc:  # raised in the run's thread once training ends (e.g. tracking outage)
                        self.sink_failure = exc
            elif payload["kind"] == CHECKPOINT:
                self.record = CheckpointRecord.from_dict(payload["record"])
            else:
                self.error = payload


def forwarding_reader(reader_class: type, outcome: LaunchOutcome, **kwargs: Any) -> Any:
    """A `reader_class` Pipes message reader that hands each message to a _ForwardingHandler first. A subclass, not
    a wrapper: Dagster's clients check the reader's class (PipesK8sClient streams the pod's log only to a
    PipesK8sPodLogsMessageReader)."""

    class ForwardingMessageReader(reader_class):  # type: ignore[misc, valid-type]
        @contextmanager
        def read_messages(self, handler: Any) -> Iterator[Any]:
            with super().read_messages(_ForwardingHandler(handler, outcome)) as params:
                yield params

    ForwardingMessageReader.__name__ = ForwardingMessageReader.__qualname__ = f"Forwarding{reader_class.__name__}"
    return ForwardingMessageReader(**kwargs)


class ComputeResource(dg.ConfigurableResource):
    """Device and thread settings (the precision is chosen per spec: 'auto' picks bf16 where it is faster), and the
    launchers of a spec's `compute:` section."""

    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # None: torch's default (all cores)
    cache_dir: str | None = None  # where frozen-model embeddings are kept for reuse across steps (None: not kept)
    kube_context: str | None = None  # k8s launcher: kubeconfig context (None: in-cluster config when in a pod)
    kubeconfig_file: str | None = None

    def settings(self, precision: str) -> ComputeSettings:
        return resolve_compute(self.device, precision, self.num_threads, self.cache_dir)

    def training_settings(self, task: Task, spec: PipelineSpec, data: pd.DataFrame, base: BaseModelRecord,
                          progress: ProgressFn) -> ComputeChoice:
        """The settings `spec` trains with: precision 'auto' and the thread count (num_threads None) chosen by
        timing a few real training steps of `base` on this machine, kept in cache_dir per machine and model
        (pipelines/core/autotune.py). A Kubernetes pod chooses on its own machine; torchrun processes share this
        machine's cores, so only the precision is timed for them."""
        from pipelines.core.autotune import ComputeChoice, tune_training_compute

        launcher = spec.compute.launcher
        if launcher == "k8s":
            return ComputeChoice(self.settings(spec.training.precision), "estimate",
                                 note="the pod chooses its precision on its own machine")
        unresolved = resolve_compute(self.device, "fp32", self.num_threads, self.cache_dir)
        return tune_training_compute(task, spec, data, base, unresolved, progress=progress,
                                     threads=None if launcher == "local" else [self.num_threads],
                                     fallback=lambda: self.settings(spec.training.precision))

    def train(self, context: dg.AssetExecutionContext, task: Task, spec: PipelineSpec, data: pd.DataFrame,
              base: BaseModelRecord, out_dir: Path, *, scratch: Path | None, exchange: Path, progress: ProgressFn,
              sink: MetricsSink | None, settings: ComputeSettings | None = None) -> CheckpointRecord:
        """Train `spec` with its launcher: in this process (local), or through Dagster Pipes as torchrun processes
        or a Kubernetes pod, which read `data` from a file in `exchange`. `settings`: as training_settings chose
        them (None: resolved from the spec's precision)."""
        launch = spec.compute
        settings = settings or self.settings(spec.training.precision)
        if launch.launcher == "local":
            return task.train(data, base, spec, out_dir, settings, progress=progress, sink=sink, scratch=scratch)
        exchange.mkdir(parents=True, exist_ok=True)
        data_file = exchange / "training_data.parquet"
        with atomic_path(data_file) as tmp:
            data.to_parquet(tmp, index=False)
        job = {"spec": spec.model_dump(mode="json"), "data": str(data_file), "base_model": base.to_dict(),
               "out_dir": str(out_dir), "scratch": str(scratch) if scratch else None,
               # num_threads is this machine's (for all processes together): the pod's worker divides its own cores.
               "compute": {"device": "auto" if launch.launcher == "k8s" else self.device,
                           # resolved here for torchrun, so that every process uses the same one
                           "precision": spec.training.precision if launch.launcher == "k8s"
                           else settings.precision,
                           "num_threads": None if launch.launcher == "k8s" or self.num_threads is None
                           else max(1, self.num_threads // launch.processes),
                           "cache_dir": self.cache_dir}}
        outcome = LaunchOutcome(sink)
        command = worker_command(launch)
        progress(f"launching training ({launch.launcher}, {launch.processes} process"
                 f"{'es' if launch.processes > 1 else ''}) through Dagster Pipes")
        try:
            if launch.launcher == "torchrun":
                self._run_subprocess(context, command, {JOB: job}, outcome, launch.processes)
            else:
                assert launch.k8s is not None  # the spec requires it for this launcher
                self._run_pod(context, launch.k8s, ["python", *command[1:]], {JOB: job}, outcome)
        except Exception as exc:
            from dagster._core.errors import DagsterPipesExecutionError

            if outcome.error:  # the training's own words (a TunelineError raised by rank 0)
                raise LaunchError(f"training ({launch.launcher}) failed: {outcome.error['message']}") from None
            if isinstance(exc, DagsterPipesExecutionError):
                raise LaunchError(f"training ({launch.launcher}) failed: {exc}. The processes' output is in the "
                                  "run's stdout/stderr (the Dagster UI's compute logs)") from exc
            raise
        finally:
            data_file.unlink(missing_ok=True)
        if outcome.sink_failure is not None:
            raise outcome.sink_failure
        if outcome.record is None:
            raise LaunchError(f"training ({launch.launcher}) ended without reporting a checkpoint")
        return outcome.record

    def _run_subprocess(self, context: dg.AssetExecutionContext, command: list[str], extras: dict[str, Any],
                        outcome: LaunchOutcome, processes: int) -> None:
        from dagster._core.pipes.utils import PipesTempFileMessageReader

        import os

        client = dg.PipesSubprocessClient(message_reader=forwarding_reader(PipesTempFileMessageReader, outcome))
        # The cores are shared among the processes (torchrun would otherwise set 1 thread each, with a warning).
        threads = max(1, (self.num_threads or usable_cores()) // processes)
        # The worker stops when this process does (killed, out of memory): an orphaned training would hold the
        # resumable checkpoint's lock and keep training beside the retried run.
        client.run(context=context, command=command, extras=extras,
                   env={"OMP_NUM_THREADS": str(threads), LAUNCHER_PID: str(os.getpid())})

    def _run_pod(self, context: dg.AssetExecutionContext, pod: KubernetesLaunchConfig, command: list[str],
                 extras: dict[str, Any], outcome: LaunchOutcome) -> None:
        client, spec = self.pod_client(outcome), training_pod_spec(pod)
        client.run(context=context, image=pod.image, command=command, namespace=pod.namespace, extras=extras,
                   base_pod_spec=spec)

    def pod_client(self, outcome: LaunchOutcome) -> Any:
        """Dagster's Kubernetes Pipes client, reading the pod's logs for the training's messages."""
        from dagster_k8s import PipesK8sClient
        from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

        return PipesK8sClient(message_reader=forwarding_reader(PipesK8sPodLogsMessageReader, outcome),
                              kube_context=self.kube_context, kubeconfig_file=self.kubeconfig_file)

