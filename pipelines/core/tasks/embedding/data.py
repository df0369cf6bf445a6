"""Retrieval's examples: the spec's query/document (or text/label) columns read from the raw rows, cleaned, and the
blocking checks on the cleaned rows and the splits (complete pairs, no query in two splits, no test document that
was a training query, a corpus larger than the k of the metrics, a relevant document for every query)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.cleaning import (CleaningResult, cell_text_at, control_character, dedup_key, escape_controls,
                                     normalise_text)
from pipelines.core.errors import SourceError
from pipelines.core.quality import (ERROR, QualityReport, check_def, evaluate_checks, lost_examples_check,
                                    validate_splits, with_row_id)
from pipelines.core.tasks.embedding.config import EmbeddingTaskConfig
from pipelines.core.tasks.embedding.retrieval import retrieval_set, text_id

if TYPE_CHECKING:
    from pipelines.core.sections import CleaningConfig, SpecView

# Columns a failed check's example rows show (where the checked table has them), in this order.
EXAMPLE_COLUMNS = ("problem", "text", "document", "document_id", "same_text_as", "label", "split", "source_file",
                   "source_row")
CLEAN_COLUMNS = ("text", "norm_text", "document", "document_id", "negative", "negative_id", "score", "label", "group",
                 "source_file", "source_row")
DROP_REASONS = ("empty_query", "empty_document", "unknown_document", "missing_label", "identical_pair",
                "control_characters", "too_long", "conflicting_labels", "exact_duplicate")
BROKEN = ("empty_query", "empty_document", "unknown_document", "identical_pair")  # what pairs_are_complete counts
METRIC_K = 10  # the largest k of the cut-off metrics (NDCG@10, MRR@10, recall@10): the corpus must be larger

CLEANED_CHECKS = ("pairs_are_complete", "documents_are_distinct", "cleaning_kept_most_rows", "row_count_within_bounds")
SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "validation_and_test_are_not_empty",
                 "test_documents_were_not_training_queries", "corpus_is_larger_than_k",
                 "every_query_has_a_relevant_document")

DESCRIPTIONS = {
    "pairs_are_complete": "No row has an empty query, an empty document (or, with task.corpus, an id the corpus "
                          "lacks), or a query equal to its own document.",
    "documents_are_distinct": "No two documents hold the same text under different ids (with task.corpus; otherwise "
                              "a document's id is its text's).",
    "cleaning_kept_most_rows": "Cleaning dropped at most quality.max_lost_fraction of the source's distinct pairs.",
    "row_count_within_bounds": "The clean dataset has between quality.min_rows and quality.max_rows rows.",
    "splits_do_not_overlap": "No query is in two splits (splits are by query).",
    "split_proportions_match_spec": "Split shares (of queries) are within quality.split_tolerance of the spec.",
    "validation_and_test_are_not_empty": "Validation and test have queries.",
    "test_documents_were_not_training_queries": "No test query's relevant document was a training query.",
    "corpus_is_larger_than_k": f"The corpus holds more documents than the k of the metrics ({METRIC_K}) and of "
                               "task.top_k.",
    "every_query_has_a_relevant_document": "Every validation and test query has a relevant document in the corpus.",
}


# ------------------------------------------------------------------------------------------------ reading
def _require_column(raw: pd.DataFrame, column: str, field_name: str) -> None:
    if column not in raw.columns:
        files = sorted(set(raw["source_file"].astype(str))) if "source_file" in raw.columns else []
        available = [c for c in raw.columns if c not in ("source_file", "source_row", "source_split")]
        raise SourceError(f"has no column {column!r} (named by {field_name}); its columns are {available}",
                          file=", ".join(files) or None, column=column)


def _texts(raw: pd.DataFrame, column: str, what: str) -> pd.Series:
    """A column's cells as text or None (pandas 3 would turn None into NaN in a column of strings)."""
    return pd.Series([cell_text_at(value, file, row, column, what)
                      for value, file, row in zip(raw[column], raw["source_file"], raw["source_row"], strict=True)],
                     index=raw.index, dtype=object)


def _score(value: Any, file: Any, row: Any, column: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise SourceError(f"holds {str(value)[:40]!r}, not a similarity score (a number in [0, 1])", file=str(file),
                          row=int(row), column=column) from None
    if not 0 <= score <= 1:  # NaN included
        raise SourceError(f"holds {value!r}: a similarity score is a number in [0, 1] (named by task.score_column)",
                          file=str(file), row=int(row), column=column)
    return score


def _document_id(value: Any, file: Any, row: Any, column: str) -> str | None:
    """A document id as text: 12, 12.0 and "12" are the same id (a column with a missing cell reads as floats)."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    text = cell_text_at(value, file, row, column, "a document id")
    return None if text is None else text.strip() or None


def _role_part(raw: pd.DataFrame, role: str) -> pd.DataFrame:
    """The raw rows one file role holds (source or corpus), with only the columns that file has."""
    roles = raw["source_role"] if "source_role" in raw.columns else pd.Series("source", index=raw.index)
    part = raw[(roles == role).to_numpy()]
    keep = [c for c in part.columns if c in ("source_file", "source_row") or part[c].notna().any()]
    return part[keep].drop(columns=["source_role"], errors="ignore")


def _select_corpus_pairs(raw: pd.DataFrame, task: EmbeddingTaskConfig) -> pd.DataFrame:
    """Query-relevance rows resolved against the corpus file: each row's document is the corpus text of its id
    (None, kept for the checks to count, when the corpus has no such id); then one row per corpus document,
    marked `shared` (the corpus every split ranks)."""
    corpus = task.corpus
    assert corpus is not None
    docs = _role_part(raw, "corpus")
    pairs = _role_part(raw, "source")
    if docs.empty:
        raise SourceError("holds no documents (expected one document per row, with columns "
                          f"{corpus.id_column!r} and {corpus.text_column!r})", file=f"task.corpus.path {corpus.path}")
    _require_column(docs, corpus.id_column, "task.corpus.id_column")
    _require_column(docs, corpus.text_column, "task.corpus.text_column")
    _require_column(pairs, task.query_column, "task.query_column")
    _require_column(pairs, task.document_id_column, "task.document_id_column")
    texts: dict[str, str | None] = {}
    first_row: dict[str, tuple[str, int]] = {}
    keep = []
    for value, text_value, file, row in zip(docs[corpus.id_column], docs[corpus.text_column], docs["source_file"],
                                            docs["source_row"], strict=True):
        doc_id = _document_id(value, file, row, corpus.id_column)
        if doc_id is None:
            raise SourceError("has no document id (every corpus row needs one: task.corpus.id_column)",
                              file=str(file), row=int(row), column=corpus.id_column)
        text = cell_text_at(text_value, file, row, corpus.text_column, "a document")
        if doc_id in texts:
            if texts[doc_id] != text:
                where = first_row[doc_id]
                raise SourceError(f"repeats document id {doc_id!r} of {where[0]} row {where[1]} with another text "
                                  "(an id names one document)", file=str(file), row=int(row),
                                  column=corpus.id_column)
            keep.append(False)
            continue
        texts[doc_id] = text
        first_row[doc_id] = (str(file), int(row))
        keep.append(True)
    docs = docs[keep]
    frame = pd.DataFrame({"source_file": pairs["source_file"].astype(str),
                          "source_row": pairs["source_row"].astype("int64")})
    frame["text"] = _texts(pairs, task.query_column, "a query")
    ids = [_document_id(v, f, r, task.document_id_column)
           for v, f, r in zip(pairs[task.document_id_column], frame["source_file"], frame["source_row"], strict=True)]
    frame["document_id"] = pd.Series(ids, index=frame.index, dtype=object)
    frame["document"] = pd.Series([texts.get(i) if i is not None else None for i in ids], index=frame.index,
                                   dtype=object)
    frame["document_known"] = [i is None or i in texts for i in ids]
    frame["negative"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    if task.score_column is not None:
        _require_column(pairs, task.score_column, "task.score_column")
        frame["score"] = [_score(v, f, r, task.score_column)
                          for v, f, r in zip(pairs[task.score_column], frame["source_file"], frame["source_row"],
                                             strict=True)]
    else:
        frame["score"] = math.nan
    frame["label"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    if "source_split" in pairs.columns:
        frame["source_split"] = pairs["source_split"].astype(str).to_numpy()
    frame["shared"] = False
    documents = pd.DataFrame({
        "source_file": docs["source_file"].astype(str).to_numpy(), "source_row": docs["source_row"].astype("int64"),
        "text": [None] * len(docs), "document_id": list(texts), "document": list(texts.values()),
        "document_known": True, "negative": [None] * len(docs), "score": math.nan, "label": [None] * len(docs),
        "shared": True})
    if "source_split" in frame.columns:
        documents["source_split"] = "shared"
    return pd.concat([frame, documents.astype({"text": object, "negative": object, "label": object})],
                     ignore_index=True)


def select_pairs(raw: pd.DataFrame, task: EmbeddingTaskConfig) -> pd.DataFrame:
    """The task's columns from the raw rows, as read (text, document, negative, score, label), with provenance.
    With task.corpus: the pairs' rows (document looked up by id), then the corpus's documents as `shared` rows."""
    if task.mode == "corpus":
        return _select_corpus_pairs(raw, task)
    frame = pd.DataFrame({"source_file": raw["source_file"].astype(str),
                          "source_row": raw["source_row"].astype("int64")})
    if task.mode == "labels":
        _require_column(raw, task.text_column, "task.text_column")
        _require_column(raw, task.relevance_label_column, "task.relevance_label_column")  # type: ignore[arg-type]
        frame["text"] = _texts(raw, task.text_column, "a text")
        frame["label"] = pd.Series([None if v is None else v.strip() or None
                                    for v in _texts(raw, task.relevance_label_column, "a label")],
                                   index=frame.index, dtype=object)
        frame["document"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        frame["negative"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        frame["score"] = math.nan
    else:
        _require_column(raw, task.query_column, "task.query_column")
        _require_column(raw, task.document_column, "task.document_column")
        frame["text"] = _texts(raw, task.query_column, "a query")
        frame["document"] = _texts(raw, task.document_column, "a document")
        if task.negative_column is not None:
            _require_column(raw, task.negative_column, "task.negative_column")
            frame["negative"] = _texts(raw, task.negative_column, "a negative document")
        else:
            frame["negative"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        if task.score_column is not None:
            _require_column(raw, task.score_column, "task.score_column")
            frame["score"] = [_score(v, f, r, task.score_column)
                              for v, f, r in zip(raw[task.score_column], frame["source_file"], frame["source_row"],
                                                 strict=True)]
        else:
            frame["score"] = math.nan
        frame["label"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    if "source_split" in raw.columns:
        frame["source_split"] = raw["source_split"].astype(str).to_numpy()
    return frame


# ----------------------------------------------------------------------------------------------- cleaning
def clean_pairs(selected: pd.DataFrame, task: EmbeddingTaskConfig, cfg: CleaningConfig) -> CleaningResult:
    """Normalise texts; drop rows with an empty query or document, a missing label, a query equal to its document,
    control characters, over-long texts (queries: cleaning.max_chars; documents: task.max_document_chars), texts
    with conflicting labels, and exact duplicates (within a source split). Every dropped row is counted by reason."""
    frame = selected.copy()
    rows_in = len(frame)
    raw_texts = {c: list(frame[c]) for c in ("text", "document", "negative")}
    controls = pd.Series([any(isinstance(v, str) and control_character(v) is not None
                              for v in (raw_texts["text"][i], raw_texts["document"][i], raw_texts["negative"][i]))
                          for i in range(rows_in)], index=frame.index)
    for column in ("text", "document", "negative"):
        frame[column] = pd.Series([None if v is None else normalise_text(v, cfg) or None for v in frame[column]],
                                  index=frame.index, dtype=object)
    labels_mode = task.mode == "labels"
    corpus_mode = task.mode == "corpus"
    # With task.corpus: rows that are the corpus's documents (no query) are checked as documents only.
    shared = frame["shared"].to_numpy(dtype=bool) if corpus_mode else np.zeros(rows_in, dtype=bool)
    queries = ~shared
    frame["norm_text"] = [None if t is None else dedup_key(t) for t in frame["text"]]
    doc_keys = [None if d is None else dedup_key(d) for d in frame["document"]]
    reason = pd.Series([None] * rows_in, index=frame.index, dtype=object)

    def mark(mask: Any, why: str) -> None:
        mask = pd.Series(np.asarray(mask, dtype=bool), index=frame.index)
        reason[mask & reason.isna()] = why

    mark(queries & np.array([t is None or len(t) < cfg.min_chars for t in frame["text"]], dtype=bool), "empty_query")
    if labels_mode:
        mark([v is None for v in frame["label"]], "missing_label")
    else:
        if corpus_mode:
            mark(~frame["document_known"].to_numpy(dtype=bool), "unknown_document")
        mark([d is None for d in frame["document"]], "empty_document")
        mark([q is not None and q == d for q, d in zip(frame["norm_text"], doc_keys, strict=True)], "identical_pair")
    mark(controls, "control_characters")
    mark([t is not None and len(t) > cfg.max_chars for t in frame["text"]], "too_long")
    mark([d is not None and len(d) > task.max_document_chars for d in frame["document"]], "too_long")
    split = ["source_split"] if "source_split" in frame.columns else []
    if labels_mode and cfg.drop_conflicting:
        alive = reason.isna()
        labels_per_text = frame[alive].groupby(["norm_text", *split])["label"].transform("nunique")
        mark(alive & (labels_per_text.reindex(frame.index) > 1).fillna(False), "conflicting_labels")
    if cfg.drop_duplicates:
        alive = reason.isna() & queries  # a corpus's documents are deduplicated by id, and checked for copies
        key = ["norm_text", *split] + ([] if labels_mode else ["doc_key"])
        keyed = frame.assign(doc_key=doc_keys)
        mark(alive & keyed[alive].duplicated(subset=key, keep="first").reindex(frame.index, fill_value=False),
             "exact_duplicate")

    dropped = {why: int((reason == why).sum()) for why in DROP_REASONS}
    shown = ["text", "document", "label", "source_file", "source_row"]
    examples = {why: frame.loc[reason == why, shown].head(5).astype(object).where(lambda f: f.notna(), None)
                .to_dict("records") for why in DROP_REASONS if dropped[why]}
    for row in examples.get("control_characters", []):
        for column in ("text", "document"):
            if isinstance(row[column], str):
                row[column] = escape_controls(row[column])
    kept = frame[reason.isna()].reset_index(drop=True)
    if not corpus_mode:  # a document's id is its text's (task.corpus gives its own ids)
        kept["document_id"] = [None if d is None else text_id("d", dedup_key(d)) for d in kept["document"]]
    kept["negative_id"] = [None if d is None else text_id("d", dedup_key(d)) for d in kept["negative"]]
    kept["group"] = kept["label"] if labels_mode else "query"
    kept["score"] = kept["score"].astype(float)
    columns = list(CLEAN_COLUMNS) + split
    if corpus_mode:
        documents = kept["shared"].to_numpy(dtype=bool)
        kept.loc[documents, "group"] = "document"
        kept.loc[documents, "text"] = ""  # a document row has no query
        kept.loc[documents, "norm_text"] = ""
        columns.append("shared")
    return CleaningResult(kept[columns].astype({"text": str, "norm_text": str, "group": str}), rows_in, dropped,
                          examples)


# -------------------------------------------------------------------------------------------------- checks
def query_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows that are examples (a query with its document or label): all but a corpus file's documents."""
    return frame[~frame["shared"].to_numpy(dtype=bool)] if "shared" in frame.columns else frame


def _duplicate_documents(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Every document whose normalised text another document holds under another id, with those ids."""
    docs = frame[frame["document"].notna()].drop_duplicates("document_id")
    keys = [dedup_key(d) for d in docs["document"]]
    ids_of: dict[str, list[str]] = {}
    for key, doc_id in zip(keys, docs["document_id"], strict=True):
        ids_of.setdefault(key, []).append(str(doc_id))
    rows = [{"document_id": doc_id, "same_text_as": ", ".join(i for i in ids_of[key] if i != doc_id)[:200],
             "problem": "same text under another id", "document": document, "source_file": file,
             "source_row": int(row)}
            for key, doc_id, document, file, row in zip(keys, docs["document_id"], docs["document"],
                                                        docs["source_file"], docs["source_row"], strict=True)
            if len(ids_of[key]) > 1]
    table = pd.DataFrame(rows, columns=["document_id", "same_text_as", "problem", "document", "source_file",
                                        "source_row"])
    return table, len(docs)


def _pair_keys(frame: pd.DataFrame) -> pd.Series:
    """The key of a distinct example: the query, and its document or label."""
    other = frame["document"].where(frame["document"].notna(), frame["label"])
    return pd.Series([f"{dedup_key(str(t))}\x1f{dedup_key(str(o))}" for t, o in zip(frame["text"], other,
                                                                                    strict=True)], dtype=object)


def validate_cleaned_pairs(frame: pd.DataFrame, spec: SpecView, raw_data: pd.DataFrame | None = None) -> QualityReport:
    """Run the cleaned_dataset checks on the asset's value (given the raw rows: the broken pairs cleaning dropped,
    and how much cleaning lost)."""
    import great_expectations.expectations as gxe

    task: EmbeddingTaskConfig = spec.task
    q = spec.quality
    rows = with_row_id(query_rows(frame))
    tables: dict[str, pd.DataFrame] = {"rows": rows}
    checks = []
    broken = pd.DataFrame(columns=["row_id", "problem", "text", "document", "source_file", "source_row"])
    lost = None
    examples = len(query_rows(frame))
    if raw_data is not None:
        selected = select_pairs(raw_data, task)
        result = clean_pairs(selected, task, spec.cleaning)
        problems = _broken_rows(query_rows(selected), task, spec.cleaning)
        broken = with_row_id(problems)
        lost, tables["lost"] = lost_examples_check(_pair_keys(query_rows(selected)), _pair_keys(query_rows(frame)),
                                                   q.max_lost_fraction, result.dropped)
        examples = len(query_rows(selected))
    share = len(broken) / max(examples, 1)
    tables["broken"] = broken
    tables["broken_share"] = pd.DataFrame([{"broken_rows": len(broken), "share": share}])
    limit = task.max_broken_pair_fraction
    checks.append(check_def(
        "pairs_are_complete",
        f"At most task.max_broken_pair_fraction ({limit:g}) of the rows have an empty query, an empty document"
        + (", a document id the corpus file lacks" if task.mode == "corpus" else "")
        + ", or a query equal to its own document (such rows teach nothing and are dropped).",
        "fill or remove the listed rows in the source (point task.query_column / task."
        + ("document_id_column" if task.mode == "corpus" else "document_column")
        + " at the right columns if every row is affected), or raise task.max_broken_pair_fraction",
        (gxe.ExpectColumnValuesToBeBetween(column="share", max_value=limit), "broken_share", ERROR),
        *(((gxe.ExpectColumnValuesToBeNull(column="problem", mostly=1.0), "broken", ERROR),) if limit == 0 else ())))
    duplicates, documents = _duplicate_documents(frame)
    tables["duplicates"] = with_row_id(duplicates)
    tables["duplicate_share"] = pd.DataFrame([{"duplicate_documents": len(duplicates),
                                               "share": len(duplicates) / max(documents, 1)}])
    most = task.corpus.max_duplicate_fraction if task.corpus is not None else 0.0
    checks.append(check_def(
        "documents_are_distinct",
        f"At most task.corpus.max_duplicate_fraction ({most:g}) of the documents hold the same text as another "
        "document under another id (the copy a query is not paired with counts as a wrong answer). Without "
        "task.corpus a document's id is its text's, so copies are one document.",
        "keep one document of each listed group in the corpus file and point the relevance pairs at its id, or "
        "raise task.corpus.max_duplicate_fraction",
        (gxe.ExpectColumnValuesToBeBetween(column="share", max_value=most), "duplicate_share", ERROR),
        *(((gxe.ExpectColumnValuesToBeNull(column="problem", mostly=1.0), "duplicates", ERROR),) if most == 0
          else ())))
    if lost is not None:
        checks.append(lost)
    else:
        tables["lost"] = pd.DataFrame([{"share_lost": 0.0}])
        checks.append(check_def("cleaning_kept_most_rows", DESCRIPTIONS["cleaning_kept_most_rows"], "nothing to fix",
                                (gxe.ExpectColumnValuesToBeBetween(column="share_lost", max_value=1.0), "lost",
                                 ERROR)))
    checks.append(check_def(
        "row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
        "provide more pairs (or fewer are being dropped by cleaning: see the asset's metadata), or change "
        "quality.min_rows / quality.max_rows",
        (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)))
    return evaluate_checks("cleaned_dataset", checks, tables, EXAMPLE_COLUMNS)


def _broken_rows(selected: pd.DataFrame, task: EmbeddingTaskConfig, cfg: CleaningConfig) -> pd.DataFrame:
    """The raw rows with an empty query or document, or a query equal to its document, and which it is."""
    problems = []
    known = selected["document_known"] if "document_known" in selected.columns else [True] * len(selected)
    for text, document, found, file, row in zip(selected["text"], selected["document"], known,
                                                selected["source_file"], selected["source_row"], strict=True):
        query = None if text is None else normalise_text(text, cfg) or None
        doc = None if document is None else normalise_text(document, cfg) or None
        problem = ("empty query" if query is None or len(query) < cfg.min_chars
                   else None if task.mode == "labels"
                   else "document id not in the corpus" if not found
                   else "empty document" if doc is None
                   else "query equals its document" if dedup_key(query) == dedup_key(doc) else None)
        if problem:
            problems.append({"problem": problem, "text": text, "document": document, "source_file": file,
                             "source_row": int(row)})
    return pd.DataFrame(problems, columns=["problem", "text", "document", "source_file", "source_row"])


def validate_retrieval_splits(frame: pd.DataFrame, spec: SpecView) -> QualityReport:
    """The splits checks: validate_splits' (overlap, shares, non-empty) on the queries, and retrieval's own (no test
    document that was a training query, a corpus larger than k, a relevant document for every query)."""
    import great_expectations.expectations as gxe

    task: EmbeddingTaskConfig = spec.task
    shared = validate_splits(query_rows(frame), spec.splits, spec.quality, "group",
                             every_group_in_train_and_test=False, example_columns=EXAMPLE_COLUMNS)
    rows = with_row_id(query_rows(frame))
    train_queries = set(rows.loc[rows["split"] == "train", "norm_text"])
    if task.mode == "labels":  # the documents are the train texts: a test text among them is the overlap above
        leaked = rows.iloc[:0].assign(document_was_training_query=pd.Series(dtype=bool))
    else:
        test = rows[rows["split"] == "test"]
        leaked = test.assign(document_was_training_query=[dedup_key(d) in train_queries for d in test["document"]])
    sets = retrieval_set(frame, task)
    corpus = pd.DataFrame([{"corpus": "shared by every split", "documents": len(sets.corpus_ids)}])
    needed = max(METRIC_K, task.top_k) + 1
    relevant = rows[rows["split"].isin(["validation", "test"])].copy()
    relevant["relevant_documents"] = [len(sets.relevant_of(split, key)) for split, key in
                                      zip(relevant["split"], relevant["norm_text"], strict=True)]
    checks = [
        check_def("test_documents_were_not_training_queries", DESCRIPTIONS["test_documents_were_not_training_queries"]
                  + " (with task.relevance_label_column the documents are the train texts, so the overlap check "
                  "covers it).",
                  "a document that was trained on as a query is easy to find again: drop the listed test rows, or "
                  "move the training rows with that text to the test split",
                  (gxe.ExpectColumnValuesToNotBeInSet(column="document_was_training_query", value_set=[True]),
                   "leaked", ERROR)),
        check_def("corpus_is_larger_than_k",
                  f"The corpus holds at least {needed} documents: more than the k of the metrics ({METRIC_K}) and "
                  f"of task.top_k ({task.top_k}), or every ranking finds everything.",
                  "add documents (rows), or lower task.top_k",
                  (gxe.ExpectColumnValuesToBeBetween(column="documents", min_value=needed), "corpus", ERROR)),
        check_def("every_query_has_a_relevant_document", DESCRIPTIONS["every_query_has_a_relevant_document"]
                  + (" With task.relevance_label_column: another text with its label in the train split."
                     if task.mode ==
                     "labels" else ""),
                  "add train rows of the listed labels, or drop those queries" if task.mode == "labels" else
                  "give every query a relevant document" + (" scored at least task.relevance_threshold" if
                                                            task.score_column else ""),
                  (gxe.ExpectColumnValuesToBeBetween(column="relevant_documents", min_value=1), "relevant", ERROR)),
    ]
    own = evaluate_checks("splits", checks, {"leaked": leaked, "corpus": corpus, "relevant": relevant},
                          EXAMPLE_COLUMNS)
    return QualityReport("splits", shared.checks + own.checks,
                         {"asset": "splits", "results": {**shared.gx_result["results"], **own.gx_result["results"]}})
