"""The retrieval-embedding Task: what the asset graph, selection and the CLI ask of this task type.

This module is light (no torch at import): loading a spec and building the Dagster definitions read only its
attributes and its checks; each heavy step imports its module when it runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.core.cleaning import cleaning_log
from pipelines.core.errors import CheckpointError
from pipelines.core.markdown import markdown_table
from pipelines.core.quality import QualityReport, QualitySuite
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, Markdown, StepLog
from pipelines.core.tasks.base import PreparedData, Predictor, ProbeResult, ServingSchema, TaskBase
from pipelines.core.tasks.embedding import NAME, WEIGHT_FILES
from pipelines.core.tasks.embedding.config import EmbeddingTaskConfig
from pipelines.core.tasks.embedding.retrieval import METRICS
from pipelines.core.tasks.embedding.data import (CLEANED_CHECKS, DESCRIPTIONS, EXAMPLE_COLUMNS, SPLITS_CHECKS,
                                                 clean_pairs, query_rows, select_pairs, validate_cleaned_pairs,
                                                 validate_retrieval_splits)
from pipelines.core.training.compute import ComputeSettings, MetricsSink, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import LocalSourceConfig, SpecView



class EmbeddingTask(TaskBase):
    """Retrieval embeddings: a query lands next to the documents relevant to it."""

    name = NAME
    config_class = EmbeddingTaskConfig
    evaluation_defaults = {"primary_metric": "ndcg_at_10", "baselines": ("base_model", "bm25")}
    # A 22M-parameter encoder trains fully: its recipe (sentence-transformers' documented one: MNRL, batch 32, one
    # epoch, learning rate 2e-5, warm-up 10%) replaces the LoRA defaults of the shared training section.
    training_defaults = {"epochs": 1, "batch_size": 32, "learning_rate": 2.0e-5, "warmup_fraction": 0.1,
                         "max_length": 128, "weight_decay": 0.01}
    primary_metrics = ("ndcg_at_10", "mrr_at_10", "map_at_100", "recall_at_10", "hit_at_1")
    baselines = ("base_model", "bm25")
    sweep_metrics = {"ndcg_at_10": "maximize", "mrr_at_10": "maximize", "map_at_100": "maximize",
                     "recall_at_10": "maximize",
                     "hit_at_1": "maximize"}
    split_group_column = "group"  # the label with task.relevance_label_column; else every row is a query
    prepared = PreparedData(
        "training_pairs",
        "The splits with what training reads added to the train rows: each pair's positive (with "
        "task.relevance_label_column, another train text of its label) and its negatives (given, or hard negatives "
        "mined from the base model's ranking of the corpus, never a relevant document).",
        ("task", "training"))
    descriptions = {
        "cleaned_dataset": "Normalised (query, document) pairs, or (text, label) rows, without empty, identical, "
                           "over-long, conflicting or duplicate rows.",
        "finetuned_checkpoint": "The sentence-transformers model trained on the training pairs (full or LoRA, merged), "
                                "the epoch with the best validation NDCG@10 kept.",
        "evaluation_report": "NDCG@10, MRR@10, MAP@100 and recall@k of the test queries over the shared corpus, for "
                             "the fine-tuned model, the base model and BM25; promotes the model if it wins.",
    }
    weight_files = WEIGHT_FILES
    predicts_tokens = False  # an embedding per text: no vocabulary-sized logits in training memory
    legacy_metadata_file = ""  # every embedding checkpoint has a manifest
    report_kinds = frozenset({"pytorch", "sentence_transformers"})
    auto_model_class = "AutoModel"
    trainer_name = "sentence_transformers.SentenceTransformerTrainer"
    example_columns = EXAMPLE_COLUMNS
    metric_names = METRICS
    serving = ServingSchema(outputs=(("query", "string"), ("rank", "long"), ("score", "double"),
                                     ("document_id", "string"), ("document", "string")),
                            prediction="document_id", score="score", rows_per_input="top_k")
    export_formats = ("sentence-transformers",)

    def side_sources(self, spec: SpecView) -> Mapping[str, LocalSourceConfig]:
        task: EmbeddingTaskConfig = spec.task
        return {"corpus": task.corpus.as_source()} if task.corpus is not None else {}

    def clean(self, raw: pd.DataFrame, spec: SpecView) -> tuple[pd.DataFrame, StepLog]:
        task: EmbeddingTaskConfig = spec.task
        result = clean_pairs(select_pairs(raw, task), task, spec.cleaning)
        frame = result.frame
        examples = query_rows(frame)
        metadata: dict[str, Any] = {"relevance": {"pairs": "query/document pairs", "labels": "texts sharing a label",
                                                  "corpus": "query / document-id pairs into a corpus file"}[task.mode]}
        if task.mode == "labels":
            counts = frame["group"].value_counts()
            metadata["labels"] = int(len(counts))
            metadata["rows_per_label"] = Markdown(markdown_table(["label", "rows"], list(counts.items())[:200]))
        else:
            metadata["distinct_queries"] = int(examples["norm_text"].nunique())
            metadata["distinct_documents"] = int(frame["document_id"].nunique())
            metadata["pairs_with_a_negative"] = int(examples["negative"].notna().sum())
        if task.mode == "corpus":
            metadata["corpus_documents"] = int(frame["document_id"].nunique())
            metadata["documents_no_query_names"] = int(len(set(frame["document_id"]) - set(examples["document_id"])))
        labels = task.mode == "labels"
        metadata["preview"] = Markdown(markdown_table(
            ["text" if labels else "query", "label" if labels else "document"],
            [[r.text, r.label if labels else r.document] for r in examples.head(5).itertuples()], 100))
        return frame, cleaning_log(spec.name, result, spec.cleaning, "rows", metadata)

    def quality_suites(self, spec: SpecView) -> tuple[QualitySuite, ...]:
        def splits_suite(value: pd.DataFrame) -> QualityReport:
            return validate_retrieval_splits(value, spec)

        return (QualitySuite("cleaned_dataset", CLEANED_CHECKS, DESCRIPTIONS,
                             lambda value, raw_data: validate_cleaned_pairs(value, spec, raw_data),
                             inputs=("raw_data",)),
                QualitySuite("splits", SPLITS_CHECKS, DESCRIPTIONS, splits_suite))

    def prepare(self, splits: pd.DataFrame, base: BaseModelRecord, spec: SpecView, compute: ComputeSettings,
                cache_dir: Path | None = None, progress: ProgressFn = print) -> tuple[pd.DataFrame, StepLog]:
        from pipelines.core.tasks.embedding.train import training_pairs

        return training_pairs(splits, base, spec, ComputeSettings())

    def model_support(self, config: dict[str, Any]) -> str | None:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        if config.get("model_type") not in MODEL_MAPPING_NAMES:
            return f"cannot do {NAME}: transformers has no AutoModel for {config.get('model_type')!r}"
        if config.get("is_decoder") or any(str(a).endswith(("ForCausalLM", "LMHeadModel"))
                                           for a in config.get("architectures") or []):
            return f"cannot do {NAME}: {config.get('model_type')!r} is a causal language model, not a text encoder"
        return None

    def mean_tokens(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
        from pipelines.core.tasks.embedding.train import mean_tokens

        return mean_tokens(record, spec, splits)

    def time_train_step(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                        compute: ComputeSettings, steps: int) -> float:
        from pipelines.core.tasks.embedding.train import time_train_step

        return time_train_step(record, spec, splits, compute, steps)

    def probe(self, record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
              compute: ComputeSettings) -> ProbeResult:
        """Zero-shot NDCG@10 on the validation queries over the whole corpus (no training), with the score on 1,000
        bootstrap resamples of those queries (the same resamples for every candidate)."""
        from pipelines.core.tasks.embedding.evaluate import probe_candidate

        return probe_candidate(record, spec, splits, compute)

    def train(self, data: pd.DataFrame, base: BaseModelRecord, spec: SpecView, out_dir: Path,
              compute: ComputeSettings, progress: ProgressFn = print,
              sink: MetricsSink | None = None, scratch: Path | None = None) -> CheckpointRecord:
        from pipelines.core.tasks.embedding.train import train_embedding

        return train_embedding(data, base, spec, out_dir, compute, progress, sink, scratch)

    def history_table(self, record: CheckpointRecord) -> str:
        epochs = [h for h in record.history if "eval_ndcg_at_10" in h]
        if not epochs:
            return "no validation split"
        return markdown_table(["epoch", "validation NDCG@10", "validation MRR@10", "validation recall@10"],
                              [[f"{h['epoch']:g}", h["eval_ndcg_at_10"], h.get("eval_mrr_at_10", float("nan")),
                                h.get("eval_recall_at_10", float("nan"))] for h in epochs])

    def evaluate(self, data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                 compute: ComputeSettings, champion: CheckpointRecord | None = None,
                 progress: ProgressFn = print, prompt_model: BaseModelRecord | None = None) -> EvaluationReport:
        from pipelines.core.tasks.embedding.evaluate import evaluate_retrieval

        return evaluate_retrieval(data, checkpoint, spec, out_dir, compute, champion, progress)

    def predictor(self, record: CheckpointRecord, compute: ComputeSettings) -> Predictor:
        """The top task.top_k documents of the pipeline's corpus for each query, with their cosine similarity."""
        from pipelines.core.tasks.embedding.retrieval import rank_by_model
        from pipelines.core.tasks.embedding.train import load_finetuned

        corpus = _corpus_of(record)
        model = load_finetuned(record, compute)
        documents, k = corpus["text"].tolist(), int(record.task_data.get("top_k", 10))

        def answer(texts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
            hits = rank_by_model(model, texts, documents, 64, k=k)
            return [{"query": query, "rank": rank + 1, "score": round(float(hit["score"]), 4),
                     "document_id": corpus["id"].iat[hit["corpus_id"]],
                     "document": corpus["text"].iat[hit["corpus_id"]]}
                    for query, row in zip(texts, hits, strict=True) for rank, hit in enumerate(row)]

        return answer

    def prediction_line(self, row: Mapping[str, Any]) -> str:
        return f"{row['query']}\t{row['rank']}\t{row['score']:.4f}\t{row['document']}"

    def export(self, record: CheckpointRecord, out_dir: Path, fmt: str) -> Path:
        """The checkpoint's sentence-transformers folder, copied whole (`SentenceTransformer(path)` loads it)."""
        from pipelines.core.files import atomic_path
        from pipelines.core.training.checkpoints import verified_folder

        source = verified_folder(record, WEIGHT_FILES) / "model"
        if out_dir.exists():
            raise CheckpointError(f"{out_dir} exists already; export writes a new folder")
        with atomic_path(out_dir) as tmp:
            shutil.copytree(source, tmp)
        return out_dir


def _corpus_of(record: CheckpointRecord) -> pd.DataFrame:
    """The corpus the checkpoint was evaluated on, saved beside its weights (corpus.parquet: id, text)."""
    path = Path(record.path) / "corpus.parquet"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {record.path} has no corpus.parquet: `tuneline predict` ranks the "
                              "pipeline's corpus, saved with the checkpoint by training")
    return pd.read_parquet(path)
