"""What every task's cleaning shares: text normalisation, the key that finds duplicates, missing values, and the
record and log of what cleaning kept and dropped (by reason). Each task cleans its own examples (text
classification: pipelines/core/tasks/classification/cleaning.py)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.core.digests import frame_digest
from pipelines.core.markdown import markdown_table
from pipelines.core.records import DatasetLog, Markdown, StepLog
from pipelines.core.sections import CleaningConfig

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
