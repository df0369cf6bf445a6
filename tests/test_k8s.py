"""Kubernetes, checked as far as it can be without a cluster: the Helm values render a run launcher and instance
config that Dagster's own schemas accept, the k8s_job_executor run config validates against the real jobs, and
the training pod that the k8s launcher hands to Dagster's PipesK8sClient is built by dagster-k8s itself (GPU
resources, the data volume, torchrun with one process per GPU, the Pipes context the worker then reads)."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from pipelines.core.spec import parse_spec
from tests.conftest import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
K8S_COMPUTE = {"launcher": "k8s", "processes": 4,
               "k8s": {"image": "registry.example.com/tuneline:0.1.0", "namespace": "tuneline", "gpus": 4,
                       "cpu": "16", "memory": "64Gi", "data_volume_claim": "tuneline-data",
                       "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}


def _values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def _run_launcher_config(values: dict[str, Any]) -> dict[str, Any]:
    """The `run_launcher.config` the chart's dagster.yaml template (dagsterYaml.runLauncher.k8s) renders from the
    values (only the keys these values use, under the template's names)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s = launcher.get("runK8sConfig", {})
    renames = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
               "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
               "jobMetadata": "job_metadata"}
    config = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": "tuneline",  # the release namespace
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": values["global"]["serviceAccountName"],
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": "tuneline-dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "env_secrets": [s["name"] for s in launcher.get("envSecrets", [])],
        "volume_mounts": launcher.get("volumeMounts", []),
        "volumes": launcher.get("volumes", []),
        "fail_pod_on_run_failure": bool(launcher.get("failPodOnRunFailure")),
        "run_k8s_config": {renames[k]: v for k, v in run_k8s.items()},
    }
    unknown = set(launcher) - {"imagePullPolicy", "loadInclusterConfig", "envSecrets", "volumeMounts", "volumes",
                               "failPodOnRunFailure", "runK8sConfig"}
    assert not unknown, f"values.yaml uses keys this test does not render: {unknown}"
    return config


def test_the_helm_values_give_a_run_launcher_dagster_accepts() -> None:
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    values = _values()
    result = process_config(K8sRunLauncher.config_type(), _run_launcher_config(values))
    assert result.success, [e.message for e in result.errors]
    config = result.value
    # Run pods mount the data volume the user code deployment mounts, at the same path as the Dockerfile's volume.
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert config["volumes"] == deployment["volumes"] and config["volume_mounts"] == deployment["volumeMounts"]
    assert config["volume_mounts"][0]["mountPath"] == "/opt/tuneline/data"
    assert "VOLUME [\"/opt/tuneline/data\"]" in (DEPLOY / "Dockerfile").read_text()
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    claim = yaml.safe_load((DEPLOY / "k8s" / "data-volume.yaml").read_text())
    assert claim["metadata"]["name"] == config["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The instance reaches PostgreSQL through psycopg2, the driver dagster-postgres installs.
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"


def test_the_helm_concurrency_settings_make_an_instance_with_a_training_pool(tmp_path: Path) -> None:
    values = _values()
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    # What the chart's dagsterYaml.concurrency template renders, in an instance Dagster then loads.
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"},
        "concurrency": {"pools": {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"]},
                        "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"]}}}))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.run_queue_config.max_concurrent_runs == 4


def test_the_step_pod_run_config_validates_against_the_k8s_definitions() -> None:
    from pipelines.definitions_k8s import defs

    run_config = yaml.safe_load((DEPLOY / "k8s" / "run-config.yaml").read_text())
    job = defs.resolve_job_def("trec_questions_job")
    assert job.executor_def.name == "k8s"
    dg.validate_run_config(job, run_config)  # raises DagsterInvalidConfigError on any unknown or wrong field
    step = next(iter(run_config["execution"]["config"]["per_step_k8s_config"]))
    assert step in {node.name for node in job.graph.nodes}, f"{step} is not a step of trec_questions_job"


class RecordedMetrics:
    """A metrics sink that keeps what it was given."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((dict(metrics), step))


class PodLogs:
    """Stands in for the Kubernetes API's pod-log stream (no cluster runs here): timestamped lines, as
    `read_namespaced_pod_log(follow=True, timestamps=True)` sends them."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def read_namespaced_pod_log(self, *args: Any, **kwargs: Any) -> Any:
        return iter([f"2026-11-27T03:00:{i:02d}.000000000Z {line}\n".encode() for i, line in enumerate(self.lines)])


def _pipes_line(method: str, params: dict[str, Any]) -> str:
    from dagster_pipes import PIPES_PROTOCOL_VERSION, PIPES_PROTOCOL_VERSION_FIELD

    return json.dumps({PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": method, "params": params})


def _checkpoint_record() -> Any:
    from pipelines.core.records import BaseModelRecord, CheckpointRecord

    base = BaseModelRecord(name="tiny", source="local", local_path="/opt/tuneline/data/models/tiny", revision=None,
                           weights_sha256="0" * 64, license="apache-2.0", parameter_count=1, architecture="Bert",
                           pooling="mean", pooling_declared_by="default", hidden_size=32, max_position_embeddings=128,
                           lora_targets=("query",), selection=({"name": "tiny", "verdict": "selected"},))
    return CheckpointRecord(path="/opt/tuneline/data/checkpoints/p/r", task="text_classification", sha256="1" * 64,
                            base_model=base, spec_hash="abc", data_sha256="2" * 64, task_data={"labels": ["a", "b"]},
                            train_rows=8, validation_rows=2, best_epoch=1.0, trainable_parameters=10, train_seconds=1.5,
                            tokens_per_second=100.0, precision="bf16", history=({"loss": 0.5, "step": 20.0},))


def _decode_pipes_param(value: str) -> dict[str, Any]:
    return json.loads(zlib.decompress(base64.b64decode(value)))


def test_the_k8s_launcher_builds_a_gpu_training_pod_that_the_worker_can_read(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's pod, made by dagster-k8s's build_pod_body from what ComputeResource hands PipesK8sClient, in
    a real Pipes session opened by a real asset; then the training worker reads its job from the pod's env."""
    from dagster._core.pipes.utils import PipesEnvContextInjector
    from dagster_k8s.pipes import PipesK8sPodLogsMessageReader, build_pod_body
    from kubernetes.client import ApiClient

    from pipelines.train_worker import _job_from_context
    from resources.compute import (JOB, ComputeResource, LaunchOutcome, forwarding_reader, training_pod_spec,
                                   worker_command)

    spec = parse_spec(yaml.safe_dump({"source": {"kind": "local", "path": "data/raw/q.csv"},
                                      "base_model": {"model": {"source": "local", "path": "models/m"}},
                                      "training": {"batch_size": 32}, "compute": K8S_COMPUTE}),
                      name="gpu_pipeline", origin="gpu_pipeline.yaml")
    assert spec.compute.k8s is not None
    pods: list[dict[str, Any]] = []
    sink = RecordedMetrics()
    outcome = LaunchOutcome(sink)
    record = _checkpoint_record()

    @dg.asset
    def training_pod(context):  # type: ignore[no-untyped-def]  (Dagster reads real annotations)
        reader = forwarding_reader(PipesK8sPodLogsMessageReader, outcome)
        with dg.open_pipes_session(context=context, extras={JOB: {"spec": spec.model_dump(mode="json")}},
                                context_injector=PipesEnvContextInjector(), message_reader=reader) as session:
            pod = build_pod_body(pod_name="train", image=spec.compute.k8s.image,
                                 command=["python", *worker_command(spec.compute)[1:]],
                                 env_vars=session.get_bootstrap_env_vars(), base_pod_meta=None,
                                 base_pod_spec=training_pod_spec(spec.compute.k8s))
            pods.append(ApiClient().sanitize_for_serialization(pod))
            # What rank 0 writes to the pod's stderr, as the Kubernetes API streams it back (timestamped lines):
            # dagster-k8s's own log consumer hands it to the launcher's reader.
            lines = [_pipes_line("log", {"message": "rank 0 of 4: cuda, bf16", "level": "INFO"}),
                     "a library's warning on stderr",
                     _pipes_line("report_custom_message", {"payload": {"kind": "metrics", "step": 20,
                                                                       "metrics": {"loss": 0.5}}}),
                     _pipes_line("report_custom_message", {"payload": {"kind": "checkpoint",
                                                                       "record": record.to_dict()}})]
            reader.consume_pod_logs(context, PodLogs(lines), "train", "tuneline")
        return dg.MaterializeResult()

    result = dg.materialize([training_pod])
    assert result.success
    assert sink.logged == [({"loss": 0.5}, 20)] and outcome.record == record and outcome.error is None
    # The client the launcher uses streams the pod's log only to a reader of this class (dagster-k8s checks it).
    client = ComputeResource().pod_client(LaunchOutcome(None))
    assert isinstance(client.message_reader, PipesK8sPodLogsMessageReader)
    [pod] = pods
    [container] = pod["spec"]["containers"]
    assert container["image"] == "registry.example.com/tuneline:0.1.0"
    assert container["command"] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                                    "-m", "pipelines.train_worker"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert {"name": "data", "mountPath": "/opt/tuneline/data"} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "tuneline-data"}} in pod["spec"]["volumes"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert _decode_pipes_param(env["DAGSTER_PIPES_MESSAGES"]) == {"stdio": "stderr"}  # read from the pod's log
    # Every rank (not only the one that opens the message channel) reads the job from that environment.
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", env["DAGSTER_PIPES_CONTEXT"])
    assert _job_from_context()["spec"]["compute"] == spec.model_dump(mode="json")["compute"]

    # deploy/k8s/training-pod.yaml shows users this pod: it is kept equal to what the launcher builds.
    shown = yaml.safe_load((DEPLOY / "k8s" / "training-pod.yaml").read_text())
    built = {**pod, "metadata": {"name": pod["metadata"]["name"]}}
    built["spec"]["containers"][0]["env"] = [{"name": n, "value": "(set by Dagster Pipes)"} for n in sorted(env)]
    assert shown == built, "deploy/k8s/training-pod.yaml is out of date:\n" + yaml.safe_dump(built, sort_keys=False)


def test_a_k8s_launcher_without_a_pod_is_refused_naming_the_field() -> None:
    from pipelines.core.errors import SpecError

    with pytest.raises(SpecError, match=r"compute.k8s.data_volume_claim is missing"):
        parse_spec(yaml.safe_dump({"source": {"kind": "local", "path": "q.csv"},
                                   "base_model": {"model": {"source": "local", "path": "m"}},
                                   "compute": {"launcher": "k8s", "k8s": {"image": "i"}}}), name="p", origin="p.yaml")
    with pytest.raises(SpecError, match=r"compute.processes is 4, but compute.k8s.gpus is 2"):
        parse_spec(yaml.safe_dump({"source": {"kind": "local", "path": "q.csv"},
                                   "base_model": {"model": {"source": "local", "path": "m"}},
                                   "compute": {"launcher": "k8s", "processes": 4,
                                               "k8s": {"image": "i", "gpus": 2, "data_volume_claim": "d"}}}),
                   name="p", origin="p.yaml")
    with pytest.raises(SpecError, match=r"compute.launcher 'k8s' needs compute.k8s"):
        parse_spec(yaml.safe_dump({"source": {"kind": "local", "path": "q.csv"},
                                   "base_model": {"model": {"source": "local", "path": "m"}},
                                   "compute": {"launcher": "k8s"}}), name="p", origin="p.yaml")
    with pytest.raises(SpecError, match=r"training.batch_size 30 is not a multiple of compute.processes 4"):
        parse_spec(yaml.safe_dump({"source": {"kind": "local", "path": "q.csv"},
                                   "base_model": {"model": {"source": "local", "path": "m"}},
                                   "training": {"batch_size": 30},
                                   "compute": {"launcher": "torchrun", "processes": 4}}), name="p", origin="p.yaml")
