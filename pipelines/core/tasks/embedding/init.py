"""How `tuneline init` proposes a retrieval-embedding spec: query/passage (or anchor/positive) columns, or texts with
a label named by --relevance-label-column; the recipe of benchmarks/specs (sentence-transformers' documented one)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipelines.core.columns import ColumnProfile, TaskChoice, by_name, quantile, text_lengths

NAME = "embedding"
# Query/document column pairs, in order of preference (names compared in lower case).
PAIRS = (("query", "passage"), ("query", "document"), ("query", "positive"), ("query", "doc"), ("query", "context"),
         ("anchor", "positive"), ("question", "passage"), ("question", "document"), ("question", "context"),
         ("sentence1", "sentence2"), ("text1", "text2"))
NEGATIVES = ("negative", "hard_negative", "negative_passage", "negative_document")
SCORES = ("score", "similarity", "relevance")
CANDIDATES = [{"source": "catalog", "id": "all-MiniLM-L6-v2"}]
LENGTHS = (64, 128, 256, 512)


class EmbeddingStarter:
    """Retrieval embeddings from query/document columns, or from texts sharing a label."""

    priority = 5  # its column names (query/passage, anchor/positive) are specific: asked first
    column_fields = ("query_column", "document_column", "negative_column", "score_column", "text_column",
                     "relevance_label_column")
    expects = ("query/passage columns (or query/document, anchor/positive, sentence1/sentence2 with a score), or "
               "texts with a label named by --relevance-label-column")

    def choose(self, profiles: Sequence[ColumnProfile], given: Mapping[str, str]) -> TaskChoice | None:
        lower = by_name(profiles)
        if given:
            if "relevance_label_column" in given:
                columns = dict(given)
                if "text_column" not in columns:
                    texts = [p for p in profiles if p.strings and p.name != given["relevance_label_column"]]
                    if not texts:
                        return None
                    columns["text_column"] = max(texts, key=lambda p: p.mean_chars).name
                return TaskChoice(NAME, columns, f"texts in {columns['text_column']!r} are relevant to each other "
                                                 f"when they share {given['relevance_label_column']!r}")
            if {"query_column", "document_column"} <= set(given):
                return TaskChoice(NAME, dict(given), "columns given: " + ", ".join(f"{k} {v!r}"
                                                                                    for k, v in given.items()))
            return None
        for query_name, document_name in PAIRS:
            query, document = lower.get(query_name), lower.get(document_name)
            if query is None or document is None or not (query.strings and document.strings):
                continue
            if document.label_like():  # few distinct values: a label, not a document
                continue
            columns = {"query_column": query.name, "document_column": document.name}
            negative = next((lower[n] for n in NEGATIVES if n in lower and lower[n].strings), None)
            if negative is not None:
                columns["negative_column"] = negative.name
            score = next((lower[n] for n in SCORES if n in lower and not lower[n].strings), None)
            if score is not None and negative is None:
                columns["score_column"] = score.name
            return TaskChoice(NAME, columns, f"query column {query.name!r} and document column {document.name!r}")
        return None

    def sections(self, frame: pd.DataFrame, choice: TaskChoice, source: Mapping[str, Any],
                 own_splits: Sequence[str], data_name: str, notes: list[str]) -> dict[str, Any]:
        columns = choice.columns
        labels = "relevance_label_column" in columns
        texts = text_lengths(frame, columns["text_column"] if labels else columns["document_column"])
        # About 4 characters a token for English: the length that holds 95% of the documents whole.
        tokens = quantile(texts, 0.95) / 4 + 2
        max_length = next((n for n in LENGTHS if tokens <= n), LENGTHS[-1])
        if max_length > 128:
            notes.append(f"training.max_length is {max_length} tokens (95% of the documents need about "
                         f"{tokens:.0f}); longer ones are truncated")
        longest = quantile(texts, 0.995)
        task: dict[str, Any] = {"type": NAME, **columns}
        if "score_column" in columns:
            task["loss"] = "cosent"
        else:
            task["loss"] = "multiple_negatives_ranking"
        task.update({"finetuning": "full", "hard_negatives": {"enabled": False}, "top_k": 10})
        if not labels and longest > 5000:
            task["max_document_chars"] = int(math.ceil(longest / 1000) * 1000)
        cleaning: dict[str, Any] = {"unicode_normalization": "NFKC", "drop_duplicates": True, "min_chars": 1,
                                    "max_chars": 2000}
        if "test" in own_splits:
            cleaning["keep_source_test"] = True
        what = (f"texts sharing a {columns['relevance_label_column']!r}" if labels
                else f"{columns['query_column']!r} queries to their {columns['document_column']!r} documents")
        return {
            "description": f"Fine-tune a sentence embedding so that search over {data_name} finds {what} (written by "
                           "tuneline init; say here what the search is for).",
            "task": task,
            "cleaning": cleaning,
            "splits": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 13, "stratify": True,
                       "overlap": "drop_from_earlier_splits"},
            "quality": {"min_rows": 50, "split_tolerance": 0.08},
            "base_model": {"candidates": CANDIDATES, "allowed_licenses": ["apache-2.0", "mit"]},
            "training": {"epochs": 1, "batch_size": 32, "learning_rate": 2.0e-5, "weight_decay": 0.01,
                         "warmup_fraction": 0.1, "max_length": max_length, "precision": "auto", "seed": 13,
                         "logging_steps": 20},
            "evaluation": {"baselines": ["base_model", "bm25"], "primary_metric": "ndcg_at_10", "batch_size": 128},
            "promotion": {"min_improvement": 0.005},
            "schedule": {"cron": "0 4 * * 1", "timezone": "UTC", "enabled": False},
            "retrain_on_new_data": False,
        }

    def task_comment(self, sections: Mapping[str, Any], counts: Mapping[str, int]) -> str:
        return (" Splits are by query; the corpus (every document, or the train texts with a relevance label) is "
                "shared by every split. The loss ranks each query's document above the batch's other documents; "
                "hard_negatives mines harder ones from the base model.")

    def judge(self, spec: Any, choice: TaskChoice, counts: Mapping[str, int], splits: Any,
              warnings: list[str], checklist: list[str]) -> None:
        columns = ", ".join(f"{k.removesuffix('_column')} = {v!r}" for k, v in choice.columns.items())
        checklist.append(f"the columns: {columns}")
        checklist.append("a few rows of cleaned_dataset in the Dagster UI read as a query and a document relevant "
                         "to it")

    def summary(self, choice: TaskChoice, counts: Mapping[str, int]) -> list[str]:
        if not counts or "relevance_label_column" not in choice.columns:
            return []
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [f"labels: {len(ordered)} (column {choice.columns['relevance_label_column']!r}): "
                + ", ".join(f"{k} {n:,}" for k, n in ordered[:12]) + (", ..." if len(ordered) > 12 else "")]
