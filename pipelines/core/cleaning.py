"""What every task's cleaning shares: text normalisation, the key that finds duplicates, missing values, and the
record and log of what cleaning kept and dropped (by reason). Each task cleans its own examples (text
classification: pipelines/core/tasks/classification/cleaning.py)."""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.digests import frame_digest
from pipelines.core.errors import SourceError
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


class NotText(ValueError):
    """A cell that cannot be read as text: a nested object, or bytes that are not UTF-8. Its message says what
    the cell holds; the caller adds the file, row and column."""


# Values whose str() is how a file writes them (a date, a decimal); anything else is not text.
_WRITTEN_AS_TEXT = (int, float, Decimal, datetime.date, datetime.time, pd.Timestamp, np.integer, np.floating)


def cell_text(value: object) -> str | None:
    """A cell as text: None when missing (None, NaN, NA); a string as it is; bytes decoded as UTF-8; a boolean as
    JSON spells it (true); a number or date as written. Never a Python repr: anything else raises NotText."""
    if isinstance(value, str):
        return str(value)  # np.str_ too
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotText(f"holds bytes that are not UTF-8 text ({data[:40]!r}: byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start}); store it as text (decoded with its real encoding)") from None
    if isinstance(value, (dict, list, tuple, set, np.ndarray)):
        kind = "a JSON object" if isinstance(value, dict) else "a list"
        raise NotText(f"holds {kind} ({str(value)[:60]}), not text")
    if is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, _WRITTEN_AS_TEXT):
        return str(value.item() if isinstance(value, np.generic) else value)
    raise NotText(f"holds a value of type {type(value).__name__} ({str(value)[:60]}), not text")


def cell_text_at(value: object, file: Any, row: Any, column: str, what: str = "text",
                 read: Callable[[object], str | None] | None = None) -> str | None:
    """One cell read by `read` (cell_text by default); a cell that is not text is a SourceError naming its file, row
    and column, and `what` the column was meant to hold (a text, a label)."""
    try:
        return (read or cell_text)(value)
    except NotText as exc:
        raise SourceError(f"{exc} (expected {what})", file=str(file), row=int(row), column=column) from None


def column_text(values: Iterable[Any], files: Iterable[Any], rows: Iterable[Any], column: str,
                what: str = "text", read: Callable[[object], str | None] | None = None) -> list[str | None]:
    """Every cell of a column as text (cell_text_at)."""
    return [cell_text_at(value, file, row, column, what, read)
            for value, file, row in zip(values, files, rows, strict=True)]


# C0 and C1 control characters other than the white space of ordinary text (tab, line feed, vertical tab, form
# feed, carriage return): NUL, escape, the file/record separators, DEL, and C1 (often mojibake: cp1252 read as
# Latin-1).
TEXT_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def control_character(text: str) -> str | None:
    """The first control character of `text` (TEXT_CONTROL), written as U+XXXX; None when there is none."""
    found = TEXT_CONTROL.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def escape_controls(text: str) -> str:
    """`text` with its control characters written as escapes (\\x00), to show in a table or a message."""
    return TEXT_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


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
