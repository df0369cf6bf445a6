"""The text classification Task: what the asset graph, selection and the CLI ask of this task type.

This module is light (no torch at import): loading a spec and building the Dagster definitions read only its
attributes and its checks; each heavy step imports its module when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.core.cleaning import cleaning_log
from pipelines.core.markdown import markdown_table
from pipelines.core.quality import QualityReport, QualitySuite, validate_splits
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, Markdown, StepLog
from pipelines.core.tasks.base import PreparedData, Predictor, ProbeResult, ServingSchema, TaskBase
from pipelines.core.tasks.classification import NAME, WEIGHT_FILES
from pipelines.core.tasks.classification.config import ClassificationTaskConfig, DoctorConfig
from pipelines.core.tasks.classification.data import (CLEANED_CHECKS, DESCRIPTIONS, EXAMPLE_COLUMNS, SPLITS_CHECKS,
                                                      select_examples, validate_cleaned_examples)
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


class ClassificationTask(TaskBase):
    """Text classification: one text column to one label column."""

    name = NAME
    config_class = ClassificationTaskConfig
    evaluation_defaults = {"primary_metric": "macro_f1", "baselines": ("majority_class", "linear_probe")}
    primary_metrics = ("accuracy", "macro_f1", "weighted_f1")
    baselines = ("majority_class", "linear_probe", "prompting")
    split_group_column = "label"
    prepared: PreparedData | None = None
    descriptions = {
        "cleaned_dataset": "Normalised (text, label) rows without empty, over-long, conflicting or duplicate rows.",
        "finetuned_checkpoint": "LoRA adapter and classifier head trained on the train split, best epoch chosen "
                                "on validation.",
        "evaluation_report": "Test metrics of the checkpoint against two baselines and the champion; promotes it "
                             "if it wins.",
    }
    weight_files = WEIGHT_FILES
    predicts_tokens = False  # logits over a few classes: no vocabulary-sized term in training memory
    legacy_metadata_file = "classifier.json"  # what checkpoints of earlier releases hold instead of a manifest
    report_kinds = frozenset({"scikitlearn", "matplotlib"})  # metrics by scikit-learn, plots by matplotlib
    auto_model_class = "AutoModel"
    trainer_name = "transformers.Trainer"
    example_columns = EXAMPLE_COLUMNS
    metric_names = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1")
    serving = ServingSchema(outputs=(("label", "string"), ("probability", "double"), ("text", "string")),
                            prediction="label", score="probability")
    export_formats = ("onnx",)
    prompts_another_model = True  # an instruction-tuned model picks among the label names
    sweep_metrics = {"macro_f1": "maximize", "accuracy": "maximize", "weighted_f1": "maximize"}

    def clean(self, raw: pd.DataFrame, spec: SpecView) -> tuple[pd.DataFrame, StepLog]:
        from pipelines.core.tasks.classification.cleaning import clean

        result = clean(select_examples(raw, spec.task), spec.cleaning)  # type: ignore[arg-type]
        counts = result.counts("label")
        total = sum(counts.values()) or 1
        return result.frame, cleaning_log(spec.name, result, spec.cleaning, "rows", {
            "num_classes": len(counts),
            "class_distribution": Markdown(markdown_table(["class", "rows", "share"],
                                                          [[k, v, f"{v / total:.1%}"] for k, v in counts.items()])),
        })

    def quality_suites(self, spec: SpecView) -> tuple[QualitySuite, ...]:
        def splits_suite(value: pd.DataFrame) -> QualityReport:
            return validate_splits(value, spec.splits, spec.quality, "label", every_group_in_train_and_test=True,
                                   example_columns=EXAMPLE_COLUMNS)

        cleaned = tuple(c for c in CLEANED_CHECKS if c != "declared_labels_have_rows" or spec.task.labels is not None)
        return (QualitySuite("cleaned_dataset", cleaned, DESCRIPTIONS,
                             lambda value, raw_data: validate_cleaned_examples(value, spec, raw_data),
                             inputs=("raw_data",)),
                QualitySuite("splits", SPLITS_CHECKS, DESCRIPTIONS, splits_suite))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                cache_dir: Path | None = None, progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
        raise NotImplementedError("text classification trains on the splits directly; it has no prepared data")

    def pooling(self, spec: SpecView) -> str:
        return spec.task.pooling  # type: ignore[union-attr]

    def doctor_settings(self, spec: SpecView) -> DoctorConfig | None:
        doctor = spec.task.doctor  # type: ignore[union-attr]
        return doctor if doctor.enabled else None

    def model_support(self, config: dict[str, Any]) -> str | None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        model_type = config.get("model_type")
        if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            return f"cannot do {NAME}: transformers has no AutoModelForSequenceClassification for {model_type!r}"
        return None

    def mean_tokens(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
        from pipelines.core.tasks.classification.model import mean_tokens

        return mean_tokens(record, spec, splits)

    def time_train_step(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        from pipelines.core.tasks.classification.train import time_train_step

        return time_train_step(record, spec, splits, compute, steps)

    def probe(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """A logistic regression on frozen embeddings of a train sample, scored on a validation sample, with the
        score on 1,000 bootstrap resamples of that sample (the same resamples for every candidate)."""
        from pipelines.core.tasks.classification.model import probe_candidate

        return probe_candidate(record, spec, splits, compute)

    def doctor(self, splits: pd.DataFrame, encoder: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
               progress: ProgressFn = print) -> Any:
        """Label suspects, cross-class near-duplicates and a learning curve from `encoder`'s frozen embeddings of
        every row (doctor.py)."""
        from pipelines.core.tasks.classification.doctor import run_doctor

        return run_doctor(splits, encoder, spec, compute, progress)

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
              compute: ComputeSettings, progress: ProgressFn = print,
              sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
        from pipelines.core.tasks.classification.train import train_classifier

        return train_classifier(data, base, spec, out_dir, compute, progress, sink, scratch)

    def history_table(self, record: CheckpointRecord) -> str:
        epochs = [h for h in record.history if "eval_accuracy" in h]
        if not epochs:
            return "no validation split"
        return markdown_table(["epoch", "validation accuracy", "validation macro-F1", "validation loss"],
                              [[f"{h['epoch']:g}", h["eval_accuracy"], h["eval_macro_f1"], h["eval_loss"]]
                               for h in epochs])

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        from pipelines.core.tasks.classification.evaluate import evaluate_classifier

        return evaluate_classifier(data, checkpoint, spec, out_dir, compute, champion, progress, prompt_model)

    def predictor(self, record: CheckpointRecord, compute: ComputeSettings) -> Predictor:
        from pipelines.core.tasks.classification.export import max_length
        from pipelines.core.tasks.classification.train import load_classifier, predict_proba

        model, tokenizer = load_classifier(record)
        labels = record.task_data["labels"]

        def answer(texts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
            probs = predict_proba(model, tokenizer, texts, max_length(record), compute)
            return [{"label": labels[int(row.argmax())], "probability": round(float(row.max()), 4), "text": text}
                    for text, row in zip(texts, probs, strict=True)]

        return answer

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        return f"{row['label']}\t{row['probability']:.4f}\t{row['text']}"

    def export(self, record: CheckpointRecord, out_dir: Path, fmt: str) -> Path:
        """ONNX (adapters merged, softmax included), checked against the checkpoint's predictions."""
        from pipelines.core.tasks.classification.export import export_onnx

        return export_onnx(record, out_dir)
