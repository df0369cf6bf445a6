"""What a table's columns hold, as far as choosing a task and its columns goes (`tuneline init`): the profile of
each column, and the choice a task type makes from them. Task types read these in their `init` modules."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipelines.core.cleaning import NotText, cell_text, is_missing
from pipelines.core.sources import PROVENANCE_COLUMNS

NOT_DATA_COLUMNS = {*PROVENANCE_COLUMNS, "source_problem"}


@dataclass(frozen=True)
class ColumnProfile:
    """What a column holds."""

    name: str
    values: int  # non-missing values
    distinct: int
    strings: bool  # every value is a string
    scalar: bool  # every value is a string, a whole number or a boolean (it could be a label)
    mean_chars: float
    wordy: float  # share of values with a letter in them
    messages: bool  # values are conversations: lists of {role, content}

    def label_like(self) -> bool:
        return self.scalar and self.distinct >= 2 and self.distinct * 3 <= self.values and self.mean_chars <= 100

    def text_like(self) -> bool:
        return self.strings and self.values > 0 and self.wordy >= 0.5

    def describe(self) -> str:
        kind = ("messages" if self.messages else "text" if self.strings else "values" if self.scalar else "other")
        return f"{self.name!r} ({kind}, {self.distinct:,} distinct of {self.values:,})"


@dataclass(frozen=True)
class TaskChoice:
    """The task type inferred from the columns, and the columns its `task:` section reads."""

    task: str  # the task type's name (task.type)
    columns: dict[str, str]  # the task section's column fields
    reason: str


class Undecided(Exception):
    """A task type's starter sees data of its kind but cannot tell which columns to use; the message says why."""


def missing(value: Any) -> bool:
    """A missing cell (None, NaN, an empty string); lists, mappings and arrays are values."""
    return not isinstance(value, list | dict) and not hasattr(value, "tolist") and is_missing(value)


def shown_text(value: Any) -> str:
    """A scalar cell as text the way the tasks read it (cleaning.cell_text: bytes decoded, never a repr), stripped;
    a cell that is not text is shown as Python writes it (the task's cleaning names its row)."""
    try:
        return (cell_text(value) or "").strip()
    except NotText:
        return str(value).strip()


def is_messages(value: Any) -> bool:
    """A conversation: a list (or its JSON text) of {role, content} mappings."""
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return False
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    if hasattr(value, "tolist"):
        value = value.tolist()
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def profile_columns(frame: pd.DataFrame) -> list[ColumnProfile]:
    """A profile of every data column (provenance columns left out), in the file's order."""
    profiles = []
    for name in frame.columns:
        if name in NOT_DATA_COLUMNS:
            continue
        values = [v for v in frame[name].tolist() if not missing(v)]
        strings = bool(values) and all(isinstance(v, str) for v in values)
        scalar = bool(values) and all(isinstance(v, str | bool | int) or (isinstance(v, float) and v.is_integer())
                                      for v in values)
        shown = [shown_text(v) for v in values] if scalar else [str(v) for v in values]
        sample = values[:200]
        profiles.append(ColumnProfile(
            name=str(name), values=len(values), distinct=len(set(shown)), strings=strings, scalar=scalar,
            mean_chars=sum(map(len, shown)) / len(shown) if shown else 0.0,
            wordy=sum(1 for s in shown if re.search(r"[^\W\d_]", s)) / len(shown) if shown else 0.0,
            messages=bool(sample) and sum(map(is_messages, sample)) >= 0.9 * len(sample)))
    return profiles


def by_name(profiles: Sequence[ColumnProfile]) -> dict[str, ColumnProfile]:
    """The profiles by lower-case column name."""
    return {p.name.lower(): p for p in profiles}


def quantile(values: Sequence[float], q: float) -> float:
    return float(pd.Series(values, dtype=float).quantile(q)) if len(values) else 0.0


def text_lengths(frame: pd.DataFrame, column: str) -> list[int]:
    """Characters of each non-missing text of a column, white space collapsed."""
    return [len(" ".join(str(v).split())) for v in frame[column] if not missing(v)]
