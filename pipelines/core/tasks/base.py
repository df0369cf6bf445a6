"""The Task protocol: everything that differs between task types, behind one interface; and the light
declaration the registry holds for each task type.

A task owns its `task:` spec section (its own settings included) and its evaluation defaults, how raw rows become
clean examples, its
quality suites, its optional prepared data (an asset between splits and training), what model selection
needs (model support, memory estimate, a timed step, a probe), and training, evaluation, prediction and
export. The asset graph, the CLI and selection call these methods and never compare task types.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from pipelines.core.columns import ColumnProfile, TaskChoice
from pipelines.core.quality import QualitySuite
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, StepLog
from pipelines.core.sections import EvaluationConfig, Frozen, LocalSourceConfig
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn
from pipelines.core.training.cost import estimate_training_memory_mb

if TYPE_CHECKING:  # the spec is assembled from the tasks' sections, so it can only be named for typing here
    from pipelines.core.sections import SpecView


@dataclass(frozen=True)
class TaskDeclaration:
    """What the registry knows of a task type without importing its implementation (no torch): enough to load and
    validate a spec, and to find the rest."""

    name: str  # the value of task.type
    config_class: type[Frozen]  # its `task:` section
    description: str  # one line: what it learns from what
    implementation: str  # "module:Class" of the Task
    starter: str  # "module:Class" of its Starter (`tuneline init`), a module that imports no torch


class Starter(Protocol):
    """How `tuneline init` proposes a spec of one task type from a data file's columns. Lives in the task package's
    light `init` module: it reads columns and writes sections, it never loads a model."""

    priority: int  # starters are asked in this order (lower first); the most permissive guess comes last
    column_fields: tuple[str, ...]  # the task-section fields that name columns (what `init --column` may set)
    expects: str  # the columns it looks for, in words (for the message when no task type fits)

    def choose(self, profiles: Sequence[ColumnProfile], given: Mapping[str, str]) -> TaskChoice | None:
        """This task type and its columns when the data looks like it (given: column fields the user named), None
        when it does not; raise columns.Undecided when it looks like it but the columns are ambiguous."""
        ...

    def sections(self, frame: pd.DataFrame, choice: TaskChoice, source: Mapping[str, Any],
                 own_splits: Sequence[str], data_name: str, notes: list[str]) -> dict[str, Any]:
        """The spec's sections (description and task first), copied from the task's default recipe and adapted
        to the data; `notes` collects what was adapted and why."""
        ...

    def task_comment(self, sections: Mapping[str, Any], counts: Mapping[str, int]) -> str:
        """What to check in the task section, written above it (after the shared comment)."""
        ...

    def judge(self, spec: SpecView, choice: TaskChoice, counts: Mapping[str, int], splits: Any,
              warnings: list[str], checklist: list[str]) -> None:
        """Warnings about the cleaned data that will block or weaken training, and what to check before running."""
        ...

    def summary(self, choice: TaskChoice, counts: Mapping[str, int]) -> list[str]:
        """Lines of init's printed summary about the groups (labels, categories) after cleaning."""
        ...


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


@dataclass(frozen=True)
class ServingSchema:
    """What a served model of the task answers: every task reads rows with a `text` column (a classifier's text, a
    chat model's instruction, a retrieval query); `outputs` are predict()'s columns with their MLflow types, in
    order, and `prediction` / `score` name the answer and the number that scores it (None: the task has none),
    which batch scoring writes beside each row."""

    outputs: tuple[tuple[str, str], ...]
    prediction: str
    score: str | None
    rows_per_input: str = "one"  # one | top_k (a retrieval model answers each query with its top k documents)


Predictor = Callable[[list[str], int], list[dict[str, Any]]]  # (texts, max_new_tokens) -> predict()'s rows


class Task(Protocol):
    """One task type (text classification, instruction tuning, ...). Implementations are stateless."""

    name: str  # the value of task.type
    config_class: type[Frozen]  # its `task:` section
    evaluation_defaults: Mapping[str, Any]  # evaluation.* values used when the spec does not set them
    training_defaults: Mapping[str, Any]  # training.* values used when the spec does not set them (its recipe)
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
    example_columns: tuple[str, ...]  # columns a failed check's example rows show, in order
    metric_names: tuple[str, ...]  # the report's metrics, in the order the run summary prints them
    serving: ServingSchema  # what predict() answers, as a served model and as scored rows

    def check_evaluation(self, evaluation: EvaluationConfig) -> None:
        """Raise ValueError, naming the field, when the evaluation section does not fit the task."""
        ...

    def side_sources(self, spec: SpecView) -> Mapping[str, LocalSourceConfig]:
        """Files the task reads beside spec.source, by role (a task field's name: task.<role>): raw_data reads them
        with the source (rows tagged by `source_role`), and their bytes are part of the data version, of lineage and
        of what the new-data sensor watches."""
        ...

    def clean(self, raw: pd.DataFrame, spec: SpecView) -> tuple[pd.DataFrame, StepLog]:
        """The task's examples from the raw rows, cleaned, with what was dropped and why."""
        ...

    def quality_suites(self, spec: SpecView) -> tuple[QualitySuite, ...]:
        """The blocking checks on cleaned_dataset, splits and the prepared data."""
        ...

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                cache_dir: Path | None = None, progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
        """The prepared data (only for a task whose `prepared` is set). `cache_dir`: a folder of the pipeline's
        that outlives runs, for what is costly to make again (the answers a model generated)."""
        ...

    def pooling(self, spec: SpecView) -> str:
        """How the base model's token states become one vector ('auto': as the model declares); recorded with the
        chosen model."""
        ...

    def doctor_settings(self, spec: SpecView) -> Any:
        """The data doctor's settings (a DoctorConfig) when the doctor runs for this spec, else None."""
        ...

    def model_support(self, config: dict[str, Any]) -> str | None:
        """Why a model with this config.json cannot do the task, or None when it can."""
        ...

    def estimate_memory_mb(self, config: dict[str, Any], parameters: int, batch_size: int, length: int,
                           precision: str) -> float:
        """Estimated training memory for one batch."""
        ...

    def mean_tokens(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
        """Mean tokens per training example with this model's tokenizer (a train sample, at most max_length)."""
        ...

    def time_train_step(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        """Median seconds per LoRA training step of the real model on real rows."""
        ...

    def probe(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """A cheap look at the model on validation rows; a higher score is better."""
        ...

    def doctor(self, splits: pd.DataFrame, encoder: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
               progress: ProgressFn = print) -> Any:
        """The data doctor's findings (a pipelines.core.doctor.DoctorReport) on every row of the splits, from the
        frozen embeddings of `encoder`."""
        ...

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
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

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        """Test metrics of the checkpoint, its baselines and the champion, with the promotion decision."""
        ...

    def predictor(self, record: CheckpointRecord, compute: ComputeSettings) -> Predictor:
        """The checkpoint loaded once, as a function from texts to predict()'s rows (what a server keeps)."""
        ...

    def predict(self, record: CheckpointRecord, texts: list[str], compute: ComputeSettings,
                max_new_tokens: int) -> list[dict[str, Any]]:
        """The model's answers to the texts (label and probability, a response, top documents): serving.outputs."""
        ...

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        """One row of predict() as a line of text for the terminal."""
        ...

    export_formats: tuple[str, ...]  # what `tuneline export --format` may ask for (the first is the default)

    def export(self, record: CheckpointRecord, out_dir: Path, fmt: str) -> Path:
        """A self-contained model folder in format `fmt` (one of export_formats), checked before it appears."""
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

    prompts_another_model = False  # tasks whose prompting baseline needs evaluation.prompting.model set this
    training_defaults: Mapping[str, Any] = {}  # the shared section's own defaults fit LoRA fine-tuning
    example_columns: tuple[str, ...] = ("text", "split", "source_file", "source_row")

    def pooling(self, spec: SpecView) -> str:
        return "auto"

    def side_sources(self, spec: SpecView) -> Mapping[str, LocalSourceConfig]:
        return {}

    def doctor_settings(self, spec: SpecView) -> Any:
        return None

    def predict(self, record: CheckpointRecord, texts: list[str], compute: ComputeSettings,
                max_new_tokens: int) -> list[dict[str, Any]]:
        return self.predictor(record, compute)(texts, max_new_tokens)  # type: ignore[attr-defined]

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        return "\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values())

    def doctor(self, splits: pd.DataFrame, encoder: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
               progress: ProgressFn = print) -> Any:
        raise NotImplementedError(f"task.type {self.name} has no data doctor")

    def estimate_memory_mb(self, config: dict[str, Any], parameters: int, batch_size: int, length: int,
                           precision: str) -> float:
        return estimate_training_memory_mb(config, parameters, batch_size, length, precision,
                                           vocabulary_logits=self.predicts_tokens)
