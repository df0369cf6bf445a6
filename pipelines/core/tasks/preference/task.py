"""The preference-tuning Task: what the asset graph, selection and the CLI ask of this task type.

This module is light (no torch at import): loading a spec and building the Dagster definitions read only its
attributes and its checks; each heavy step imports its module when it runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.core.cleaning import cleaning_log
from pipelines.core.markdown import markdown_table
from pipelines.core.quality import QualityReport, QualitySuite, validate_splits
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, Markdown, StepLog
from pipelines.core.tasks.base import PreparedData, Predictor, ProbeResult, TaskBase
from pipelines.core.tasks.instruction.task import InstructionTuningTask
from pipelines.core.tasks.preference import NAME, WEIGHT_FILES
from pipelines.core.tasks.preference.config import PreferenceTaskConfig
from pipelines.core.tasks.preference.data import (CLEANED_CHECKS, DESCRIPTIONS, EXAMPLE_COLUMNS, PAIRS_CHECKS,
                                                  PRIMARY_METRICS, REPORT_METRICS, SPLITS_CHECKS, clean_pairs,
                                                  select_pairs, validate_cleaned_pairs, validate_pairs)
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView

# A preference checkpoint is a chat model's LoRA adapter laid out as instruction tuning's: that task loads, answers
# with and exports it (and says which models can be tuned), so the code is not written twice.
_CHAT = InstructionTuningTask()


class PreferenceTask(TaskBase):
    """Preference tuning: a chat model's preference for chosen over rejected answers (DPO, IPO or KTO)."""

    name = NAME
    config_class = PreferenceTaskConfig
    # Promotion is decided by what the model answers: log-probability rankings can improve while greedy answers
    # degrade (measured on banking77: benchmarks/RESULTS.md), so exact_match is the default primary metric.
    evaluation_defaults = {"primary_metric": "exact_match", "baselines": ("starting_model", "sft_on_chosen")}
    training_defaults = {"learning_rate": 5e-5, "epochs": 2, "batch_size": 8, "warmup_fraction": 0.1}
    primary_metrics = PRIMARY_METRICS
    baselines = ("starting_model", "sft_on_chosen")
    sweep_metrics = {"loss": "minimize", "rewards/accuracies": "maximize", "rewards/margins": "maximize"}
    split_group_column = "category"
    prepared = PreparedData(
        "preference_pairs",
        "Every split's pairs rendered with the starting model's chat template and counted in tokens; where the "
        "data has no rejected answer the starting model's own greedy answer is the rejected one (cached by model "
        "and prompt; left out where it equals the chosen one); pairs over training.max_length are dropped.",
        ("task", "training"))
    descriptions = {
        "cleaned_dataset": "Preference pairs (prompt, chosen, rejected) with normalised text, without malformed, "
                           "over-long or duplicate rows; incomplete pairs and identical answers block training.",
        "finetuned_checkpoint": "LoRA adapter of the starting model trained on the train pairs with the task's "
                                "method (DPO, IPO or KTO; the reference is the starting model, adapter off); the "
                                "epoch with the lowest validation loss is kept.",
        "evaluation_report": "Implicit-reward and likelihood accuracy, reward margin and log-probabilities on the "
                             "test pairs, greedy answers (length, match with the chosen answer), for the tuned "
                             "model, the starting model and an SFT-on-chosen adapter; promotes the checkpoint if "
                             "it wins.",
    }
    trainer_name = "trl.DPOTrainer / trl.KTOTrainer"
    auto_model_class = "AutoModelForCausalLM"
    predicts_tokens = True
    report_kinds = frozenset({"pytorch", "transformers"})
    weight_files = WEIGHT_FILES
    legacy_metadata_file = ""
    example_columns = EXAMPLE_COLUMNS
    metric_names = REPORT_METRICS
    serving = InstructionTuningTask.serving
    export_formats = InstructionTuningTask.export_formats

    def clean(self, raw: pd.DataFrame, spec: SpecView) -> tuple[pd.DataFrame, StepLog]:
        result = clean_pairs(select_pairs(raw, spec.task), spec)
        frame = result.frame
        missing = int((frame["rejected"].astype(str).str.strip() == "").sum())
        return frame, cleaning_log(spec.name, result, spec.cleaning, "pairs", {
            "distinct_prompts": int(frame["norm_text"].nunique()),
            "pairs_without_rejected": missing,
            "categories": Markdown(markdown_table(["category", "rows"], list(result.counts("category").items()))),
            "preview": Markdown(markdown_table(["prompt", "chosen", "rejected"],
                                               [[r.text, r.chosen, r.rejected] for r in frame.head(5).itertuples()],
                                               80)),
        })

    def quality_suites(self, spec: SpecView) -> tuple[QualitySuite, ...]:
        def splits_suite(value: pd.DataFrame) -> QualityReport:
            return validate_splits(value, spec.splits, spec.quality, "category", every_group_in_train_and_test=False,
                                   example_columns=EXAMPLE_COLUMNS)

        def pairs_suite(value: pd.DataFrame) -> QualityReport:
            return validate_pairs(value, spec)

        return (QualitySuite("cleaned_dataset", CLEANED_CHECKS, DESCRIPTIONS,
                             lambda value, raw_data: validate_cleaned_pairs(value, spec, raw_data),
                             inputs=("raw_data",)),
                QualitySuite("splits", SPLITS_CHECKS, DESCRIPTIONS, splits_suite),
                QualitySuite("preference_pairs", PAIRS_CHECKS, DESCRIPTIONS, pairs_suite))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                cache_dir: Path | None = None, progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
        from pipelines.core.tasks.preference.pairs import build_pairs, pairs_log

        result = build_pairs(splits, base, spec, compute, cache_dir, progress)
        return result.frame, pairs_log(spec.name, result, spec)

    def model_support(self, config: dict[str, Any]) -> str | None:
        """The same models as instruction tuning: causal language models."""
        return _CHAT.model_support(config)

    def mean_tokens(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
        """Tokens a pair costs per step: the prompt twice and both answers (characters / 3.5, a sample)."""
        train = splits[splits["split"] == "train"].head(256)
        if train.empty:
            return float(spec.training.max_length)
        chars = (2 * train["text"].str.len() + train["chosen"].str.len() + train["rejected"].str.len()).mean()
        return float(min(chars / 3.5 + 48, 2 * spec.training.max_length))

    def time_train_step(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        from pipelines.core.tasks.instruction.train import time_train_step

        conversations = splits.assign(response=splits["chosen"], messages=[
            _conversation(p, c) for p, c in zip(splits["prompt_messages"], splits["chosen"], strict=True)])
        return 2 * time_train_step(record, spec, conversations, compute, steps)  # chosen and rejected per pair

    def probe(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        from pipelines.core.tasks.preference.evaluate import probe_candidate

        return probe_candidate(record, spec, splits, compute)

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
              compute: ComputeSettings, progress: ProgressFn = print,
              sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
        from pipelines.core.tasks.preference.train import train_preference

        return train_preference(data, base, spec, out_dir, compute, progress, sink, scratch)

    def history_table(self, record: CheckpointRecord) -> str:
        epochs = [h for h in record.history if "eval_loss" in h]
        if not epochs:
            return "no validation split"
        return markdown_table(["epoch", "validation loss", "validation reward accuracy", "validation reward margin"],
                              [[f"{h['epoch']:g}", h["eval_loss"], h.get("eval_rewards/accuracies", math.nan),
                                h.get("eval_rewards/margins", math.nan)] for h in epochs])

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        from pipelines.core.tasks.preference.evaluate import evaluate_preference

        return evaluate_preference(data, checkpoint, spec, out_dir, compute, champion, progress)

    def predictor(self, record: CheckpointRecord, compute: ComputeSettings) -> Predictor:
        """Greedy answers in the model's chat template, as instruction tuning answers (the same checkpoint layout)."""
        return _CHAT.predictor(record, compute)

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        return _CHAT.prediction_line(row)

    def export(self, record: CheckpointRecord, out_dir: Path, fmt: str) -> Path:
        return _CHAT.export(record, out_dir, fmt)


def _conversation(prompt_messages: str, answer: str) -> str:
    import json

    return json.dumps([*json.loads(prompt_messages), {"role": "assistant", "content": answer}], ensure_ascii=False)
