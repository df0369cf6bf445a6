"""Retrieval as the report and the checks see it: the corpus shared by every split, the queries of each split and
the documents relevant to each; rankings by an embedding model (cosine similarity) or by BM25 (bm25s); and the IR
metrics, computed by sentence-transformers' InformationRetrievalEvaluator on those rankings."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.tasks.embedding.config import EmbeddingTaskConfig

if TYPE_CHECKING:
    from pipelines.core.training.compute import ComputeSettings

RETRIEVED = 100  # documents ranked per query: enough for MAP@100
METRICS = ("ndcg_at_10", "mrr_at_10", "map_at_100", "recall_at_1", "recall_at_5", "recall_at_10", "hit_at_1",
           "hit_at_10")


@dataclass(frozen=True)
class RetrievalSet:
    """The corpus (ids and texts, shared by every split) and, per split, the queries and their relevant documents."""

    corpus_ids: tuple[str, ...]
    corpus_texts: tuple[str, ...]
    queries: dict[str, dict[str, str]]  # split -> query id -> text
    relevant: dict[str, dict[str, set[str]]]  # split -> query id -> relevant document ids
    corpus_origin: str  # in words: what the corpus is
    query_ids: dict[str, str] = field(default_factory=dict)  # a query's normalised text -> its id

    def relevant_of(self, split: str, norm_text: str) -> set[str]:
        return self.relevant.get(split, {}).get(self.query_ids.get(norm_text, ""), set())

    def document_text(self) -> dict[str, str]:
        return dict(zip(self.corpus_ids, self.corpus_texts, strict=True))


def retrieval_set(frame: pd.DataFrame, task: EmbeddingTaskConfig) -> RetrievalSet:
    """The retrieval view of the splits (or of the prepared data, which holds them)."""
    queries: dict[str, dict[str, str]] = {}
    relevant: dict[str, dict[str, set[str]]] = {}
    query_ids: dict[str, str] = {}
    if task.mode == "labels":
        train = frame[frame["split"] == "train"].drop_duplicates("norm_text")
        ids = [text_id("t", key) for key in train["norm_text"]]
        corpus = dict(zip(ids, train["text"], strict=True))
        by_group: dict[str, set[str]] = {}
        for doc_id, group in zip(ids, train["group"], strict=True):
            by_group.setdefault(str(group), set()).add(doc_id)
        for split, part in frame.groupby("split", sort=False):
            for key, text, group in zip(part["norm_text"], part["text"], part["group"], strict=True):
                qid = text_id("q", key)
                query_ids[key] = qid
                queries.setdefault(str(split), {})[qid] = text
                own = {text_id("t", key)} if split == "train" else set()  # a text is not relevant to itself
                relevant.setdefault(str(split), {})[qid] = by_group.get(str(group), set()) - own
        origin = f"the {len(corpus)} texts of the train split (relevant: the same label)"
    else:
        corpus = {}
        for doc_id, text in zip(frame["document_id"], frame["document"], strict=True):
            corpus.setdefault(doc_id, text)
        if "negative_id" in frame.columns:
            for doc_id, text in zip(frame["negative_id"], frame["negative"], strict=True):
                if doc_id is not None and isinstance(text, str):
                    corpus.setdefault(doc_id, text)
        scored = task.score_column is not None
        examples = frame[~frame["shared"].to_numpy(dtype=bool)] if "shared" in frame.columns else frame
        for split, part in examples.groupby("split", sort=False):
            for key, text, doc_id, score in zip(part["norm_text"], part["text"], part["document_id"], part["score"],
                                                strict=True):
                qid = text_id("q", key)
                query_ids[key] = qid
                queries.setdefault(str(split), {}).setdefault(qid, text)
                docs = relevant.setdefault(str(split), {}).setdefault(qid, set())
                if not scored or float(score) >= task.relevance_threshold:
                    docs.add(doc_id)
        origin = (f"the {len(corpus)} documents of the corpus file {task.corpus.path}" if task.corpus is not None
                  else f"the {len(corpus)} distinct documents of every split") + (
            " (relevant: pairs scored at least task.relevance_threshold)" if scored else "")
    return RetrievalSet(tuple(corpus), tuple(corpus.values()), queries, relevant, origin, query_ids)


def text_id(prefix: str, key: str) -> str:
    """A stable id of a text from its normalised key (the same text, the same id, in every split and run)."""
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ ranking
Hits = list[list[dict[str, Any]]]  # per query: [{"corpus_id": index into the corpus, "score": float}], best first


def load_sentence_model(path: str, compute: ComputeSettings, max_length: int | None = None) -> Any:
    """A sentence-transformers model from a local folder (its modules.json, or a plain transformers encoder with
    mean pooling when the folder has none)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=compute.device, local_files_only=True)
    if max_length is not None:
        model.max_seq_length = max_length
    return model


def encode(model: Any, texts: Sequence[str], batch_size: int, progress: bool = False) -> Any:
    """Unit-length embeddings of `texts` (a torch tensor, one row per text)."""
    return model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                        show_progress_bar=progress)


def rank_by_model(model: Any, queries: Sequence[str], corpus: Sequence[str], batch_size: int,
                  k: int = RETRIEVED, corpus_embeddings: Any = None) -> Hits:
    """Every query's top-k corpus documents by cosine similarity of the model's embeddings."""
    from sentence_transformers.util import semantic_search

    if not queries:
        return []
    docs = corpus_embeddings if corpus_embeddings is not None else encode(model, corpus, batch_size)
    return semantic_search(encode(model, queries, batch_size), docs, top_k=min(k, len(corpus)))


def rank_by_bm25(queries: Sequence[str], corpus: Sequence[str], k: int = RETRIEVED) -> Hits:
    """Every query's top-k corpus documents by BM25 (bm25s: Lucene's variant, English stop words removed)."""
    import bm25s

    if not queries:
        return []
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus), stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    k = min(k, len(corpus))
    documents, scores = retriever.retrieve(tokens, k=k, show_progress=False)
    return [[{"corpus_id": int(d), "score": float(s)} for d, s in zip(row_docs, row_scores, strict=True)]
            for row_docs, row_scores in zip(documents, scores, strict=True)]


# ------------------------------------------------------------------------------------------------ metrics
class Scorer:
    """The IR metrics of rankings of one split's queries, computed by sentence-transformers'
    InformationRetrievalEvaluator (NDCG@10, MRR@10, MAP@100, recall@1/5/10, and hit@k: the share of queries with a
    relevant document in the top k). Recall@k is the share of a query's relevant documents found in its top k: with
    many relevant documents per query (texts sharing a label) recall_at_1 is at most 1 / their number."""

    def __init__(self, sets: RetrievalSet, split: str) -> None:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

        self.sets = sets
        relevant = {q: docs for q, docs in sets.relevant.get(split, {}).items() if docs}
        self.query_ids = [q for q in sets.queries.get(split, {}) if q in relevant]
        self.query_texts = [sets.queries[split][q] for q in self.query_ids]
        self.evaluator = InformationRetrievalEvaluator(
            queries={q: sets.queries[split][q] for q in self.query_ids},
            corpus=dict(zip(sets.corpus_ids, sets.corpus_texts, strict=True)), relevant_docs=relevant,
            mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[1, 5, 10], map_at_k=[100],
            write_csv=False, name=split)

    def _as_ids(self, hits: Hits) -> Hits:
        ids = self.sets.corpus_ids
        return [[{"corpus_id": ids[h["corpus_id"]], "score": h["score"]} for h in row] for row in hits]

    @staticmethod
    def _flat(scores: dict[str, dict[int, float]]) -> dict[str, float]:
        return {"ndcg_at_10": float(scores["ndcg@k"][10]), "mrr_at_10": float(scores["mrr@k"][10]),
                "map_at_100": float(scores["map@k"][100]), "recall_at_1": float(scores["recall@k"][1]),
                "recall_at_5": float(scores["recall@k"][5]), "recall_at_10": float(scores["recall@k"][10]),
                "hit_at_1": float(scores["accuracy@k"][1]), "hit_at_10": float(scores["accuracy@k"][10])}

    def metrics(self, hits: Hits) -> dict[str, float]:
        """The split's metrics of one ranking (hits in the order of self.query_ids)."""
        if not self.query_ids:
            return {m: 0.0 for m in METRICS}
        return self._flat(self.evaluator.compute_metrics(self._as_ids(hits)))

    def per_query(self, hits: Hits, metric: str = "ndcg_at_10") -> np.ndarray:
        """One metric for each query (the evaluator asked about that query alone)."""
        single = copy.copy(self.evaluator)
        values = []
        for qid, text, row in zip(self.query_ids, self.query_texts, self._as_ids(hits), strict=True):
            single.queries_ids, single.queries = [qid], [text]
            values.append(self._flat(single.compute_metrics([row]))[metric])
        return np.asarray(values, dtype=float)

    def rank(self, ranker: Callable[[Sequence[str], Sequence[str]], Hits]) -> Hits:
        return ranker(self.query_texts, self.sets.corpus_texts)
