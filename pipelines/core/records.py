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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointRecord:
    """A fine-tuned checkpoint on disk: adapter + classifier head, and what produced it."""

    path: str
    sha256: str  # digest over the checkpoint's weight files
    base_model: BaseModelRecord
    spec_hash: str
    data_sha256: str  # digest of the splits table it was trained and selected on (= the splits asset's sha256)
    labels: tuple[str, ...]
    train_rows: int
    validation_rows: int
    best_epoch: float | None
    trainable_parameters: int
    train_seconds: float
    tokens_per_second: float
    precision: str
    peak_memory_mb: float = 0.0
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)
    model_version: str | None = None  # the registry version, once registered
    task: str = "text_classification"  # or instruction_tuning (a LoRA adapter on a causal language model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvaluationReport:
    """Test-split metrics of the fine-tuned model and its baselines, with the files that show them."""

    pipeline: str
    checkpoint_sha256: str
    test_rows: int
    labels: tuple[str, ...]
    metrics: dict[str, float]  # accuracy, macro_f1, ... of the fine-tuned model
    per_class: tuple[dict[str, Any], ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    baselines: dict[str, dict[str, float]]  # baseline name -> metrics
    primary_metric: str
    beats_baselines: dict[str, bool]
    promotion: dict[str, Any]  # {"promote": bool, "reason": str, "candidate_version", "champion_version"}
    champion_metrics: dict[str, float] | None
    json_path: str
    html_path: str
    confusion_matrix_png: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The headline numbers, as `tuneline run --json` prints them."""
        return {
            "pipeline": self.pipeline,
            "test_rows": self.test_rows,
            **{k: round(v, 4) for k, v in self.metrics.items()},
            "baselines": {b: {k: round(v, 4) for k, v in m.items()} for b, m in self.baselines.items()},
            "primary_metric": self.primary_metric,
            "beats_baselines": dict(self.beats_baselines),
            "promoted": bool(self.promotion.get("promote")),
            "promotion_reason": self.promotion.get("reason", ""),
            "report_html": self.html_path,
            "report_json": self.json_path,
        }


@dataclass(frozen=True)
class GenerationReport:
    """Losses, perplexity and scored greedy generations of a fine-tuned chat model and of its base model."""

    pipeline: str
    checkpoint_sha256: str
    test_rows: int
    test_prompts: int  # distinct test instructions generated for (an instruction may have several references)
    metrics: dict[str, float]  # fine-tuned: validation/test loss and perplexity, exact_match, token_f1, rouge_l
    baselines: dict[str, dict[str, float]]  # "base_model" -> the same metrics before fine-tuning
    primary_metric: str
    beats_baselines: dict[str, bool]
    promotion: dict[str, Any]
    champion_metrics: dict[str, float] | None
    samples: tuple[dict[str, str], ...]  # instruction, reference, base output, fine-tuned output
    json_path: str
    html_path: str
    generations_path: str  # every test generation with its scores (JSONL)
    task: str = "instruction_tuning"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The headline numbers, as `tuneline run --json` prints them."""
        return {
            "pipeline": self.pipeline,
            "task": self.task,
            "test_rows": self.test_rows,
            "test_prompts": self.test_prompts,
            **{k: round(v, 4) for k, v in self.metrics.items()},
            "metric_names": list(self.metrics),
            "baselines": {b: {k: round(v, 4) for k, v in m.items()} for b, m in self.baselines.items()},
            "primary_metric": self.primary_metric,
            "beats_baselines": dict(self.beats_baselines),
            "promoted": bool(self.promotion.get("promote")),
            "promotion_reason": self.promotion.get("reason", ""),
            "report_html": self.html_path,
            "report_json": self.json_path,
        }
