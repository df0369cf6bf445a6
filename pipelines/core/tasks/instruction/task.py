"""The instruction-tuning Task: what the asset graph, selection and the CLI ask of this task type.

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
from pipelines.core.tasks.base import PreparedData, Predictor, ProbeResult, ServingSchema, TaskBase
from pipelines.core.tasks.instruction import NAME, WEIGHT_FILES
from pipelines.core.tasks.instruction.config import InstructionTuningTaskConfig
from pipelines.core.tasks.instruction.data import (CLEANED_CHECKS, DESCRIPTIONS, EXAMPLE_COLUMNS, GENERATION_METRICS,
                                                   RENDERED_CHECKS, REPORT_METRICS, SPLITS_CHECKS, select_conversations,
                                                   validate_cleaned_conversations, validate_rendered_dataset)
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


class InstructionTuningTask(TaskBase):
    """Instruction tuning: a chat model's responses to instructions, in the model's own chat template."""

    name = NAME
    config_class = InstructionTuningTaskConfig
    evaluation_defaults = {"primary_metric": "rouge_l", "baselines": ("base_model",)}
    primary_metrics = GENERATION_METRICS
    baselines = ("base_model", "prompting")
    sweep_metrics = {"loss": "minimize", "mean_token_accuracy": "maximize"}  # generation is not scored per epoch
    split_group_column = "category"
    prepared = PreparedData(
        "rendered_dataset",
        "Every split's conversations rendered with the base model's chat template and tokenized; prompt tokens "
        "are masked from the loss; examples over training.max_length are dropped or truncated.",
        ("task", "training"))
    descriptions = {
        "cleaned_dataset": "Conversations (JSON messages) without malformed, empty, over-long or duplicate rows.",
        "finetuned_checkpoint": "LoRA adapter of the chat model trained on the rendered train split (loss on "
                                "responses only); the epoch with the lowest validation loss is kept.",
        "evaluation_report": "Loss and perplexity on validation and test, and scored greedy test generations "
                             "(exact match, token F1, ROUGE-L), for the base and the fine-tuned model; promotes "
                             "the checkpoint if it wins.",
    }
    trainer_name = "trl.SFTTrainer (completion_only_loss)"
    auto_model_class = "AutoModelForCausalLM"
    predicts_tokens = True  # training memory holds logits over the whole vocabulary
    report_kinds = frozenset({"pytorch", "transformers"})  # generation with the transformers model
    weight_files = WEIGHT_FILES  # the adapter; the base model's weights are pinned by their own digest
    legacy_metadata_file = "causal_lm.json"  # what checkpoints of earlier releases hold instead of a manifest
    example_columns = EXAMPLE_COLUMNS
    metric_names = REPORT_METRICS
    serving = ServingSchema(outputs=(("instruction", "string"), ("response", "string")), prediction="response",
                            score=None)
    # merged: base and adapter in one transformers folder; gguf: that folder plus gguf/model.gguf (Llama models)
    export_formats = ("merged", "gguf")

    def clean(self, raw: pd.DataFrame, spec: SpecView) -> tuple[pd.DataFrame, StepLog]:
        from pipelines.core.tasks.instruction.chat import clean_conversations

        result = clean_conversations(select_conversations(raw, spec.task), spec.cleaning)  # type: ignore[arg-type]
        frame = result.frame
        per_instruction = frame.groupby("norm_text").size()
        return frame, cleaning_log(spec.name, result, spec.cleaning, "conversations", {
            "distinct_instructions": int(len(per_instruction)),
            "instructions_with_several_responses": int((per_instruction > 1).sum()),
            "categories": Markdown(markdown_table(["category", "rows"], list(result.counts("category").items()))),
            "preview": Markdown(markdown_table(["instruction", "response", "category"],
                                               [[r.text, r.response, r.category] for r in frame.head(5).itertuples()],
                                               100)),
        })

    def quality_suites(self, spec: SpecView) -> tuple[QualitySuite, ...]:
        def splits_suite(value: pd.DataFrame) -> QualityReport:
            # categories are reported per split, not required in every split
            return validate_splits(value, spec.splits, spec.quality, "category", every_group_in_train_and_test=False,
                                   example_columns=EXAMPLE_COLUMNS)

        def rendered_suite(value: pd.DataFrame, splits: pd.DataFrame) -> QualityReport:
            return validate_rendered_dataset(value, spec, rows_in=len(splits))  # dropped rows are not in `value`

        return (QualitySuite("cleaned_dataset", CLEANED_CHECKS, DESCRIPTIONS,
                             lambda value, raw_data: validate_cleaned_conversations(value, spec, raw_data),
                             inputs=("raw_data",)),
                QualitySuite("splits", SPLITS_CHECKS, DESCRIPTIONS, splits_suite),
                QualitySuite("rendered_dataset", RENDERED_CHECKS, DESCRIPTIONS, rendered_suite, inputs=("splits",)))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                cache_dir: Path | None = None, progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
        from transformers import AutoTokenizer

        from pipelines.core.tasks.instruction.chat import render_conversations
        from pipelines.core.tasks.instruction.data import rendered_log

        tokenizer = AutoTokenizer.from_pretrained(base.local_path)
        overlength = spec.task.overlength  # type: ignore[union-attr]
        result = render_conversations(splits, tokenizer, spec.training.max_length, overlength)
        return result.frame, rendered_log(spec.name, result, spec, overlength)

    def model_support(self, config: dict[str, Any]) -> str | None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        architectures = [str(a) for a in config.get("architectures") or []]
        if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return (f"cannot do {NAME}: {architectures or config.get('model_type')} is not a causal language model "
                    "(no AutoModelForCausalLM head in its weights)")
        return None

    def mean_tokens(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
        from pipelines.core.tasks.instruction.train import mean_tokens

        return mean_tokens(record, spec, splits)

    def time_train_step(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        from pipelines.core.tasks.instruction.train import time_train_step

        return time_train_step(record, spec, splits, compute, steps)

    def probe(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """The base model's loss on the responses of a validation sample (lower is better). No resamples: token
        losses under different tokenizers are not paired, so candidates are ranked by the loss alone."""
        from pipelines.core.tasks.instruction.evaluate import probe_candidate

        return probe_candidate(record, spec, splits, compute)

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
              compute: ComputeSettings, progress: ProgressFn = print,
              sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
        from pipelines.core.tasks.instruction.train import train_causal_lm

        return train_causal_lm(data, base, spec, out_dir, compute, progress, sink, scratch)

    def history_table(self, record: CheckpointRecord) -> str:
        epochs = [h for h in record.history if "eval_loss" in h]
        if not epochs:
            return "no validation split"
        return markdown_table(["epoch", "validation loss", "validation token accuracy"],
                              [[f"{h['epoch']:g}", h["eval_loss"], h.get("eval_mean_token_accuracy", math.nan)]
                               for h in epochs])

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        from pipelines.core.tasks.instruction.evaluate import evaluate_generation

        return evaluate_generation(data, checkpoint, spec, out_dir, compute, champion, progress, prompt_model)

    def predictor(self, record: CheckpointRecord, compute: ComputeSettings) -> Predictor:
        """Greedy answers, each instruction rendered with the model's chat template."""
        from pipelines.core.tasks.instruction.chat import render_prompt
        from pipelines.core.tasks.instruction.evaluate import generate
        from pipelines.core.tasks.instruction.train import load_finetuned_lm

        model, tokenizer = load_finetuned_lm(record)

        def answer(texts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
            prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}, {"role": "assistant", "content": ""}])
                       for t in texts]
            answers = generate(model, tokenizer, prompts, max_new_tokens, 8, compute)
            return [{"instruction": t, "response": a} for t, a in zip(texts, answers, strict=True)]

        return answer

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        return f"{row['instruction']}\t{row['response']}"

    def export(self, record: CheckpointRecord, out_dir: Path, fmt: str) -> Path:
        from pipelines.core.tasks.instruction.train import export_merged

        return export_merged(record, out_dir, with_gguf=fmt == "gguf")
