"""Small frozen records passed between stages: heavy artifacts move as references, never as objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SourceRecord:
    """Where raw data came from, pinned by content digest."""

    kind: str
    location: str
    sha256: str
    files: tuple[tuple[str, str], ...]  # (file, sha256) per file read
    sizes: tuple[int, ...] = ()  # bytes of each file, in the order of `files`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BaseModelRecord:
    """A base model resolved to local weights, pinned by their digest."""

    name: str
    source: str  # package | local | hub
    local_path: str
    revision: str | None
    weights_sha256: str
    license: str | None
    parameter_count: int
    architecture: str
    pooling: str
    pooling_declared_by: str  # which file (or default) decided the pooling
    hidden_size: int
    max_position_embeddings: int
    gguf_file: str | None = None  # the GGUF file the local safetensors folder was de-quantized from
    weight_format: str = "safetensors"  # safetensors | gguf | pickle
    model_type: str = ""
    trust_remote_code: bool = False
    lora_targets: tuple[str, ...] = ()  # the spec's LoRA target modules this model has (empty: all of the spec's)
    selection: tuple[dict[str, Any], ...] = ()  # every candidate with its figures, verdict and reason
    # A model made from another pipeline's registered champion (its base with its adapter merged in): pipeline,
    # version, checkpoint_sha256, data_sha256, mlflow_run_id, dagster_run_id and the base it was trained on.
    started_from: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BaseModelRecord:
        """The record `to_dict` made (e.g. read back from JSON, where tuples became lists)."""
        return BaseModelRecord(**{**data, "lora_targets": tuple(data.get("lora_targets", ())),
                                  "selection": tuple(data.get("selection", ()))})


def model_origin(source: str, revision: str | None, local_path: str | None, gguf_file: str | None) -> str:
    """Where a base model came from, in words: the package version it is shipped in, its commit on the Hugging Face
    Hub, or its local folder; and the GGUF file it was de-quantized from."""
    if source == "package":
        where = f"package {revision}"
    elif source == "hub":
        where = f"Hugging Face Hub revision {revision}"
    else:
        where = f"{source} folder {local_path}" if local_path else source
    return where + (f", de-quantized from {gguf_file}" if gguf_file else "")


@dataclass(frozen=True)
class CheckpointRecord:
    """A fine-tuned checkpoint on disk (its manifest names the task, base model and digests), and what produced it."""

    path: str
    task: str  # the task.type that trained it; pipelines.core.tasks knows how to load and use it
    sha256: str  # digest over the checkpoint's weight files (the manifest lists them)
    base_model: BaseModelRecord
    spec_hash: str
    data_sha256: str  # digest of the table it was trained and selected on (= that asset's sha256)
    train_rows: int
    validation_rows: int
    best_epoch: float | None
    trainable_parameters: int
    train_seconds: float
    tokens_per_second: float
    precision: str
    peak_memory_mb: float = 0.0
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)
    mfu: float = 0.0  # model FLOPs per second of training over this machine's measured matmul peak
    model_version: str | None = None  # the registry version, once registered
    # What the task needs besides the weights to use the checkpoint, as JSON values (a classifier: its labels).
    task_data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> CheckpointRecord:
        """The record `to_dict` made (e.g. sent as JSON by a training process); a record of an earlier release,
        with its classes in `labels`, reads as task_data {"labels": [...]}."""
        data = dict(data)
        labels = data.pop("labels", None)
        task_data = dict(data.pop("task_data", None) or ({"labels": list(labels)} if labels else {}))
        return CheckpointRecord(**{**data, "base_model": BaseModelRecord.from_dict(data["base_model"]),
                                   "history": tuple(dict(h) for h in data.get("history", ())),
                                   "task_data": task_data})


@dataclass(frozen=True)
class Promotion:
    """Whether a candidate becomes the registry's champion, and why, in words a person can check."""

    promote: bool
    reason: str
    primary_metric: str
    candidate_version: str | None
    champion_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReportTable:
    """A titled table of a report (per-class scores, sample generations, ...), rendered as Markdown and HTML."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class EvaluationReport:
    """Test-split metrics of the fine-tuned model, its baselines and the champion, with the promotion decision.

    One record for every task: `metric_names` orders the report's metric rows, `tables` and `images` carry the
    task's own sections, `details` its raw data (labels, confusion matrix, ...), `files` what was written.
    """

    pipeline: str
    task: str
    checkpoint_sha256: str
    test_rows: int
    metric_names: tuple[str, ...]
    metrics: dict[str, float]  # the fine-tuned model's
    baselines: dict[str, dict[str, float]]  # baseline name -> metrics
    primary_metric: str
    beats_baselines: dict[str, bool]
    promotion: Promotion
    champion_metrics: dict[str, float] | None
    headline: str  # one sentence on what was evaluated, e.g. "549 test rows"
    tables: tuple[ReportTable, ...] = ()
    images: tuple[tuple[str, str], ...] = ()  # (title, file name inside the report folder)
    details: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # report_json, report_html, and the task's own files
    verdict: str = ""  # one sentence: did fine-tuning pay off against the best baseline without training?
    lineage: dict[str, str] = field(default_factory=dict)  # what made the model: data digest, base model, spec, runs

    @property
    def json_path(self) -> str:
        return self.files["report_json"]

    @property
    def html_path(self) -> str:
        return self.files["report_html"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The headline numbers, as `tuneline run --json` prints them."""
        return {
            "pipeline": self.pipeline,
            "task": self.task,
            "test_rows": self.test_rows,
            **{k: round(v, 4) for k, v in self.metrics.items()},
            "metric_names": list(self.metric_names),
            "baselines": {b: {k: round(v, 4) for k, v in m.items()} for b, m in self.baselines.items()},
            "primary_metric": self.primary_metric,
            "beats_baselines": dict(self.beats_baselines),
            "promoted": self.promotion.promote,
            "promotion_reason": self.promotion.reason,
            "verdict": self.verdict,
            "report_html": self.html_path,
            "report_json": self.json_path,
        }


class Markdown(str):
    """Metadata text to show as Markdown (tables, examples)."""


class FilePath(str):
    """Metadata that is a path on this machine."""


@dataclass(frozen=True)
class DatasetLog:
    """A table to record as a tracked dataset input, by digest (the table itself is not copied)."""

    frame: Any  # pandas.DataFrame
    name: str
    digest: str
    context: str  # raw, cleaned, train, ...
    source: str


@dataclass(frozen=True)
class StepLog:
    """What one pipeline step asks to have recorded: in the experiment tracker and as asset metadata.

    `metadata` values are plain numbers, strings, booleans, lists/dicts (JSON), Markdown or FilePath.
    """

    data_version: str
    message: str = ""  # one line for the run's log
    metadata: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    datasets: tuple[DatasetLog, ...] = ()
    artifacts: tuple[tuple[str, str | None], ...] = ()  # (file or folder, artifact folder)
    texts: tuple[tuple[str, str], ...] = ()  # (text, artifact file name)
    tags: dict[str, str] = field(default_factory=dict)
