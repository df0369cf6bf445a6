"""The Task protocol: everything that differs between task types, behind one interface.

A task owns its `task:` spec section and its evaluation defaults, how raw rows become clean examples, its
quality suites, its optional prepared data (an asset between splits and training), what model selection
needs (model support, memory estimate, a timed step, a probe), and training, evaluation, prediction and
export. The asset graph, the CLI and selection call these methods and never compare task types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from pipelines.core.quality import QualitySuite
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, StepLog
from pipelines.core.sections import EvaluationConfig, Frozen
from pipelines.core.trainer import ComputeSettings, MetricsSink, ProgressFn, estimate_training_memory_mb

if TYPE_CHECKING:  # the spec is assembled from the tasks' sections, so it can only be named for typing here
    from pipelines.core.spec import PipelineSpec


class CandidateRejected(Exception):
    """A candidate model breaks a constraint; the message is the reason shown in the selection table."""


@dataclass(frozen=True)
class PreparedData:
    """An asset a task adds between splits and training, made from the splits and the chosen base model."""

    name: str  # the asset's name, e.g. rendered_dataset
    description: str  # shown in the Dagster UI
    spec_sections: tuple[str, ...]  # the spec sections its code version hashes


@dataclass(frozen=True)
class ProbeResult:
    """A cheap look at a candidate on validation rows: the metric's name and value, a score (higher is better),
    and optionally the score on bootstrap resamples of the validation sample, drawn from the spec's seed so that
    every candidate is scored on the same resamples (paired): how often one candidate beats another there says
    whether the probe can tell them apart."""

    metric: str
    value: float
    score: float
    replicates: Any = None  # numpy array of scores, one per resample, or None


class Task(Protocol):
    """One task type (text classification, instruction tuning, ...). Implementations are stateless."""

    name: str  # the value of task.type
    config_class: type[Frozen]  # its `task:` section
    evaluation_defaults: Mapping[str, Any]  # evaluation.* values used when the spec does not set them
    primary_metrics: tuple[str, ...]  # what evaluation.primary_metric may be
    baselines: tuple[str, ...]  # what evaluation.baselines may list
    split_group_column: str  # the column splits are stratified and tabulated by
    prepared: PreparedData | None  # the task's own asset between splits and training, if any
    descriptions: Mapping[str, str]  # UI descriptions of cleaned_dataset, finetuned_checkpoint, evaluation_report
    weight_files: tuple[str, ...]  # the files of a checkpoint its digest covers
    legacy_metadata_file: str  # the metadata file of its checkpoints from before manifests
    report_kinds: frozenset[str]  # Dagster kinds of its evaluation report
    auto_model_class: str  # transformers Auto class whose skeleton lists the model's linear layers
    trainer_name: str  # what trains it, for the records

    def check_evaluation(self, evaluation: EvaluationConfig) -> None:
        """Raise ValueError, naming the field, when the evaluation section does not fit the task."""
        ...

    def clean(self, raw: pd.DataFrame, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
        """The task's examples from the raw rows, cleaned, with what was dropped and why."""
        ...

    def quality_suites(self, spec: PipelineSpec) -> tuple[QualitySuite, ...]:
        """The blocking checks on cleaned_dataset, splits and the prepared data."""
        ...

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec) -> tuple[pd.DataFrame, StepLog]:
        """The prepared data (only for a task whose `prepared` is set)."""
        ...

    def model_support(self, config: dict[str, Any]) -> str | None:
        """Why a model with this config.json cannot do the task, or None when it can."""
        ...

    def estimate_memory_mb(self, config: dict[str, Any], parameters: int, batch_size: int, length: int,
                           precision: str) -> float:
        """Estimated training memory for one batch."""
        ...

    def mean_tokens(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame) -> float:
        """Mean tokens per training example with this model's tokenizer (a train sample, at most max_length)."""
        ...

    def time_train_step(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        """Median seconds per LoRA training step of the real model on real rows."""
        ...

    def probe(self, record: BaseModelRecord, spec: PipelineSpec, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """A cheap look at the model on validation rows; a higher score is better."""
        ...

    doctor_supported: bool  # whether doctor() exists (the data doctor's check is built for this task)

    def doctor(self, splits: pd.DataFrame, encoder: BaseModelRecord, spec: PipelineSpec, compute: ComputeSettings,
               progress: ProgressFn = print) -> Any:
        """The data doctor's findings (a pipelines.core.doctor.DoctorReport) on every row of the splits, from the
        frozen embeddings of `encoder`."""
        ...

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: PipelineSpec, out_dir: Path,
              compute: ComputeSettings, progress: ProgressFn = print,
              sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
        """LoRA fine-tuning on the train rows of `data`; the best epoch on validation is saved to `out_dir`.
        With `scratch` (the pipeline's scratch folder), resumable checkpoints are saved there as
        training.checkpoint_every says, and a run interrupted with the same spec, data and base model resumes."""
        ...

    def history_table(self, record: CheckpointRecord) -> str:
        """The validation metrics by epoch, as Markdown."""
        ...

    prompts_another_model: bool  # its prompting baseline prompts evaluation.prompting.model (pinned by the caller)
    sweep_metrics: Mapping[str, str]  # validation metrics a sweep may optimise (as the history names them without
    # the eval_ prefix) -> "maximize" / "minimize"

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: PipelineSpec, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        """Test metrics of the checkpoint, its baselines and the champion, with the promotion decision."""
        ...

    def predict(self, record: CheckpointRecord, texts: list[str], compute: ComputeSettings,
                max_new_tokens: int) -> list[dict[str, Any]]:
        """One row per input text: the model's answer (label and probability, or a response)."""
        ...

    def export(self, record: CheckpointRecord, out_dir: Path) -> Path:
        """A self-contained model folder that plain transformers loads."""
        ...


class TaskBase:
    """What every task implementation shares: the evaluation section is checked against its lists."""

    name: str
    primary_metrics: tuple[str, ...]
    baselines: tuple[str, ...]
    predicts_tokens: bool  # training holds logits over the vocabulary (language models), not over classes

    def check_evaluation(self, evaluation: EvaluationConfig) -> None:
        if evaluation.primary_metric not in self.primary_metrics:
            raise ValueError(f"evaluation.primary_metric {evaluation.primary_metric!r} does not fit task.type "
                             f"{self.name}: use one of {sorted(self.primary_metrics)}")
        wrong = [b for b in evaluation.baselines if b not in self.baselines]
        if wrong:
            raise ValueError(f"evaluation.baselines {wrong} do not fit task.type {self.name}: it compares with "
                             f"{list(self.baselines)}")

    doctor_supported = False  # tasks with a data doctor set this and implement doctor()
    prompts_another_model = False  # tasks whose prompting baseline needs evaluation.prompting.model set this

    def doctor(self, splits: pd.DataFrame, encoder: BaseModelRecord, spec: PipelineSpec, compute: ComputeSettings,
               progress: ProgressFn = print) -> Any:
        raise NotImplementedError(f"task.type {self.name} has no data doctor")

    def estimate_memory_mb(self, config: dict[str, Any], parameters: int, batch_size: int, length: int,
                           precision: str) -> float:
        return estimate_training_memory_mb(config, parameters, batch_size, length, precision,
                                           vocabulary_logits=self.predicts_tokens)
