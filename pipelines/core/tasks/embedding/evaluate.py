"""Retrieval's evaluation report (the fine-tuned model against the base model zero-shot, BM25 and the champion, on
the test queries over the shared corpus; the queries fine-tuning helped and hurt most, with their top results) and
the selection probe (zero-shot NDCG@10 on validation queries: no training)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.evaluation import build_report, champion_metrics
from pipelines.core.records import BaseModelRecord, CheckpointRecord, EvaluationReport, ReportTable
from pipelines.core.tasks.base import ProbeResult
from pipelines.core.tasks.embedding import NAME
from pipelines.core.tasks.embedding.config import EmbeddingTaskConfig
from pipelines.core.tasks.embedding.retrieval import (METRICS, Hits, Scorer, load_sentence_model, rank_by_bm25,
                                                      rank_by_model, retrieval_set)
from pipelines.core.training.compute import ComputeSettings, ProgressFn

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView

PRIMARY = "ndcg_at_10"
BOOTSTRAP = 1000  # resamples of the probe's validation queries


def _top(hits: list[dict[str, Any]], scorer: Scorer, relevant: set[str], k: int) -> str:
    ids, texts = scorer.sets.corpus_ids, scorer.sets.corpus_texts
    shown = []
    for hit in hits[:k]:
        mark = "✓" if ids[hit["corpus_id"]] in relevant else "✗"
        text = texts[hit["corpus_id"]]
        shown.append(f"{mark} {hit['score']:.3f} {text if len(text) <= 70 else text[:67] + '...'}")
    return " · ".join(shown)


def _changed_queries(scorer: Scorer, split: str, base_hits: Hits, tuned_hits: Hits, shown: int,
                     k: int) -> tuple[ReportTable, ReportTable, list[dict[str, Any]]]:
    """The queries whose NDCG@10 fine-tuning raised and lowered most, with each model's top results."""
    base = scorer.per_query(base_hits)
    tuned = scorer.per_query(tuned_hits)
    change = tuned - base
    order = np.argsort(change, kind="stable")
    texts = scorer.sets.document_text()
    rows = []
    for i in range(len(change)):
        relevant = scorer.sets.relevant[split][scorer.query_ids[i]]
        rows.append({"query": scorer.query_texts[i], "relevant": len(relevant),
                     "a_relevant_document": texts[sorted(relevant)[0]] if relevant else "",
                     "base_ndcg_at_10": round(float(base[i]), 4), "finetuned_ndcg_at_10": round(float(tuned[i]), 4),
                     "change": round(float(change[i]), 4),
                     "base_top": _top(base_hits[i], scorer, relevant, k),
                     "finetuned_top": _top(tuned_hits[i], scorer, relevant, k)})
    header = ("query", "relevant documents", "base NDCG@10", "fine-tuned NDCG@10", "base model's top 3 (✓ relevant)",
              "fine-tuned model's top 3")

    def table(title: str, picks: Any) -> ReportTable:
        return ReportTable(title, header, tuple((rows[i]["query"], rows[i]["relevant"], rows[i]["base_ndcg_at_10"],
                                                 rows[i]["finetuned_ndcg_at_10"], rows[i]["base_top"],
                                                 rows[i]["finetuned_top"]) for i in picks))

    better = [i for i in order[::-1] if change[i] > 0][:shown]
    worse = [i for i in order if change[i] < 0][:shown]
    return (table(f"Queries fine-tuning improved most ({int((change > 0).sum())} improved in all)", better),
            table(f"Queries fine-tuning worsened most ({int((change < 0).sum())} worsened in all)", worse), rows)


def evaluate_retrieval(data: pd.DataFrame, checkpoint: CheckpointRecord, spec: SpecView, out_dir: Path,
                       compute: ComputeSettings, champion: CheckpointRecord | None = None,
                       progress: ProgressFn = print) -> EvaluationReport:
    """NDCG@10, MRR@10, MAP@100, recall@1/5/10 and hit@1/10 of the test queries over the shared corpus for the
    fine-tuned model, the base model zero-shot and BM25 (and the champion); decides promotion."""
    from pipelines.core.files import write_bytes_atomic
    from pipelines.core.tasks.embedding.train import load_finetuned

    task: EmbeddingTaskConfig = spec.task
    batch = spec.evaluation.batch_size
    sets = retrieval_set(data, task)
    scorer = Scorer(sets, "test")
    progress(f"ranking {len(scorer.query_ids)} test queries over a corpus of {len(sets.corpus_ids)} documents")
    tuned = load_finetuned(checkpoint, compute)
    tuned_hits = scorer.rank(lambda q, c: rank_by_model(tuned, q, c, batch))
    metrics = scorer.metrics(tuned_hits)
    base_model = load_sentence_model(checkpoint.base_model.local_path, compute)
    base_hits = scorer.rank(lambda q, c: rank_by_model(base_model, q, c, batch))
    baselines: dict[str, dict[str, float]] = {}
    if "base_model" in spec.evaluation.baselines:
        baselines["base_model"] = scorer.metrics(base_hits)
    if "bm25" in spec.evaluation.baselines:
        baselines["bm25"] = scorer.metrics(scorer.rank(rank_by_bm25))
    progress("test " + ", ".join(f"{name} {PRIMARY} {m[PRIMARY]:.4f}"
                                 for name, m in {"fine-tuned": metrics, **baselines}.items()))

    def score_champion(record: CheckpointRecord) -> dict[str, float]:
        model = load_finetuned(record, compute)
        return scorer.metrics(scorer.rank(lambda q, c: rank_by_model(model, q, c, batch)))

    better, worse, per_query = _changed_queries(scorer, "test", base_hits, tuned_hits, task.shown_queries, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries_csv = out_dir / "test_queries.csv"
    write_bytes_atomic(queries_csv, pd.DataFrame(per_query).to_csv(index=False).encode())
    return build_report(
        pipeline=spec.name, task=NAME, checkpoint=checkpoint, test_rows=len(scorer.query_ids),
        headline=f"{len(scorer.query_ids)} test queries ranked over a corpus of {len(sets.corpus_ids)} documents "
                 f"({sets.corpus_origin})",
        metric_names=METRICS, metrics=metrics, baselines=baselines, champion=champion,
        champion_scores=champion_metrics(champion, checkpoint, metrics, score_champion, progress),
        primary=spec.evaluation.primary_metric, min_improvement=spec.promotion.min_improvement, out_dir=out_dir,
        tables=(better, worse, ReportTable("Corpus", ("documents", "what it is"),
                                           ((len(sets.corpus_ids), sets.corpus_origin),))),
        details={"corpus_documents": len(sets.corpus_ids), "corpus": sets.corpus_origin,
                 "test_queries": len(scorer.query_ids),
                 "mean_relevant_per_query": round(float(np.mean([len(sets.relevant["test"][q])
                                                                  for q in scorer.query_ids]))
                                                  if scorer.query_ids else 0.0, 2),
                 "queries_improved": int(sum(r["change"] > 0 for r in per_query)),
                 "queries_worsened": int(sum(r["change"] < 0 for r in per_query))},
        files={"test_queries": str(queries_csv)})


def probe_candidate(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                    compute: ComputeSettings) -> ProbeResult:
    """Zero-shot NDCG@10 of the candidate on (a sample of) the validation queries over the whole corpus, with the
    score on bootstrap resamples of those queries drawn from the splits' seed (the same for every candidate)."""
    task: EmbeddingTaskConfig = spec.task
    sets = retrieval_set(splits, task)
    split = "validation" if sets.queries.get("validation") else "train"
    scorer = Scorer(sets, split)
    rng = np.random.default_rng(spec.splits.seed)
    if len(scorer.query_ids) > spec.base_model.probe.sample_rows:
        keep = sorted(rng.choice(len(scorer.query_ids), spec.base_model.probe.sample_rows, replace=False))
        scorer.query_ids = [scorer.query_ids[i] for i in keep]
        scorer.query_texts = [scorer.query_texts[i] for i in keep]
        scorer.evaluator.queries_ids, scorer.evaluator.queries = scorer.query_ids, scorer.query_texts
    model = load_sentence_model(record.local_path, compute, spec.training.max_length)
    per_query = scorer.per_query(scorer.rank(lambda q, c: rank_by_model(model, q, c, spec.evaluation.batch_size)))
    value = float(per_query.mean()) if len(per_query) else 0.0
    draws = rng.integers(0, max(len(per_query), 1), size=(BOOTSTRAP, len(per_query)))
    replicates = per_query[draws].mean(axis=1) if len(per_query) else None
    return ProbeResult(PRIMARY, round(value, 4), value, replicates)
