"""Turn raw rows into a clean dataset of (text, label), counting every dropped row by its reason."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.core.evaluation import markdown_table
from pipelines.core.lineage import frame_digest
from pipelines.core.records import DatasetLog, Markdown, StepLog
from pipelines.core.sections import CleaningConfig

# The order in which rows are dropped; a row is counted under the first reason that applies.
DROP_REASONS = ("empty_text", "missing_label", "too_long", "conflicting_labels", "exact_duplicate",
                "normalised_duplicate")
CLEAN_COLUMNS = ("text", "label", "norm_text", "source_file", "source_row")
_WHITESPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[\W_]+")


def normalise_text(text: str, cfg: CleaningConfig) -> str:
    """The text as it is kept: unicode normal form and collapsed white space."""
    if cfg.unicode_normalization != "none":
        text = unicodedata.normalize(cfg.unicode_normalization, text)
    if cfg.collapse_whitespace:
        text = _WHITESPACE.sub(" ", text).strip()
    return text


def dedup_key(text: str) -> str:
    """The key under which two texts count as the same question: case, punctuation and spacing ignored."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _NOT_WORD.sub(" ", folded).strip()


@dataclass(frozen=True)
class CleaningResult:
    """The clean rows, and what was dropped and why."""

    frame: pd.DataFrame
    rows_in: int
    dropped: dict[str, int]
    dropped_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return len(self.frame)

    def counts(self, column: str) -> dict[str, int]:
        """Rows kept per value of `column` (label, category), sorted by value."""
        return {str(k): int(v) for k, v in self.frame[column].value_counts().sort_index().items()}


def is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def clean(examples: pd.DataFrame, cfg: CleaningConfig) -> CleaningResult:
    """Normalise texts and drop empty, unlabelled, over-long, conflicting and duplicate rows.

    When the source brings its own splits, duplicates are only dropped within a split: a text in two
    splits is leakage, which the quality checks report instead of hiding it.
    """
    rows_in = len(examples)
    frame = examples.copy()
    # pandas 3 stores a missing string as NaN: test with is_missing, never `is None`.
    frame["text"] = pd.Series([None if is_missing(t) else normalise_text(str(t), cfg) for t in frame["text"]],
                              index=frame.index, dtype=object)
    frame["label"] = pd.Series([None if is_missing(v) else str(v) for v in frame["label"]],
                               index=frame.index, dtype=object)
    frame["norm_text"] = [None if t is None else dedup_key(t) for t in frame["text"]]
    reason = pd.Series([None] * len(frame), index=frame.index, dtype=object)

    def mark(mask: pd.Series, why: str) -> None:
        reason[mask & reason.isna()] = why

    lengths = frame["text"].map(lambda t: 0 if t is None else len(t))
    mark(lengths < cfg.min_chars, "empty_text")
    mark(frame["label"].map(lambda v: v is None).astype(bool), "missing_label")
    mark(lengths > cfg.max_chars, "too_long")

    alive = reason.isna()
    group = ["norm_text", "source_split"] if "source_split" in frame.columns else ["norm_text"]
    # An official test split kept whole (cleaning.keep_source_test) loses no row to duplicates or conflicts.
    kept_whole = (frame["source_split"] == "test") if cfg.keep_source_test and "source_split" in frame.columns \
        else pd.Series(False, index=frame.index)
    if cfg.drop_conflicting:  # within a split, like duplicates: across splits it is leakage, for the checks
        labels_per_text = frame[alive].groupby(group)["label"].transform("nunique")
        mark(alive & ~kept_whole & (labels_per_text.reindex(frame.index) > 1), "conflicting_labels")
    if cfg.drop_duplicates:
        exact = ["text", "label"] + group[1:]
        alive = reason.isna()
        mark(alive & ~kept_whole & frame[alive].duplicated(subset=exact, keep="first")
             .reindex(frame.index, fill_value=False), "exact_duplicate")
        alive = reason.isna()
        mark(alive & ~kept_whole & frame[alive].duplicated(subset=group, keep="first")
             .reindex(frame.index, fill_value=False), "normalised_duplicate")

    dropped = {why: int((reason == why).sum()) for why in DROP_REASONS}
    examples_by_reason = {
        why: frame.loc[reason == why, ["text", "label", "source_file", "source_row"]]
        .head(5).astype(object).where(lambda f: f.notna(), None).to_dict("records")
        for why in DROP_REASONS if dropped[why]
    }
    kept = frame[reason.isna()].reset_index(drop=True)
    columns = list(CLEAN_COLUMNS) + (["source_split"] if "source_split" in kept.columns else [])
    kept = kept[columns].astype({"text": str, "label": str, "norm_text": str})
    return CleaningResult(kept, rows_in, dropped, examples_by_reason)


def cleaning_log(pipeline: str, result: CleaningResult, cfg: CleaningConfig, noun: str,
                 metadata: dict[str, Any]) -> StepLog:
    """What a cleaned_dataset records, for any task: rows in and kept, drops by reason with examples, the
    digest of the clean table, and the task's own `metadata`."""
    frame, rows_in, dropped = result.frame, result.rows_in, result.dropped
    digest = frame_digest(frame)
    examples = "\n\n".join(
        f"**{why}** (first {len(rows)}):\n\n" + markdown_table(list(rows[0]), [list(r.values()) for r in rows], 80)
        for why, rows in result.dropped_examples.items() if rows)
    dropped_text = ", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none"
    return StepLog(
        data_version=digest[:32], message=f"kept {len(frame)} of {rows_in} {noun}; dropped {dropped_text}",
        metadata={
            "dagster/row_count": len(frame),
            "rows_in": rows_in,
            "rows_kept": len(frame),
            "rows_dropped": rows_in - len(frame),
            **{f"dropped_{why}": n for why, n in dropped.items()},
            "dropped_by_reason": Markdown(markdown_table(["reason", "rows"], list(dropped.items()))),
            "dropped_examples": Markdown(examples or "nothing dropped"),
            **metadata,
            "sha256": digest,
        },
        params={f"cleaning.{k}": v for k, v in cfg.model_dump().items()},
        metrics={"rows_in": rows_in, "rows_kept": len(frame), **{f"dropped_{why}": n for why, n in dropped.items()}},
        datasets=(DatasetLog(frame, f"{pipeline}/cleaned_dataset", digest, "cleaned", "cleaning"),))
