"""How `tuneline init` proposes a text regression spec: a text column and a column of numbers that are not few
distinct labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipelines.core.columns import ColumnProfile, TaskChoice
from tests.tasks.regression import NAME


class RegressionStarter:
    priority = 50  # after instruction pairs, before classification (whose labels are few distinct values)
    column_fields = ("text_column", "target_column")
    expects = "a text column and a `target` column of numbers"

    def choose(self, profiles: Sequence[ColumnProfile], given: Mapping[str, str]) -> TaskChoice | None:
        target = next((p for p in profiles if p.name.lower() == given.get("target_column", "target").lower()), None)
        text = next((p for p in profiles if p.text_like() and p is not target), None)
        # A CSV's numbers may read as text: a target is a column whose values hold no letters, and are not a few
        # distinct labels.
        if target is None or text is None or target.wordy > 0 or target.label_like():
            return None
        return TaskChoice(NAME, {"text_column": text.name, "target_column": target.name},
                          f"text column {text.name!r} and numeric target {target.name!r}")

    def sections(self, frame: pd.DataFrame, choice: TaskChoice, source: Mapping[str, Any],
                 own_splits: Sequence[str], data_name: str, notes: list[str]) -> dict[str, Any]:
        return {"description": f"Predict {choice.columns['target_column']} from the texts of {data_name}.",
                "task": {"type": NAME, **choice.columns},
                "quality": {"min_rows": 20},
                "base_model": {"candidates": [{"source": "catalog", "id": "all-MiniLM-L6-v2"}]},
                "evaluation": {"baselines": ["mean_target"], "primary_metric": "r2"}}

    def task_comment(self, sections: Mapping[str, Any], counts: Mapping[str, int]) -> str:
        return " The target column holds numbers; rows without one are dropped."

    def judge(self, spec: Any, choice: TaskChoice, counts: Mapping[str, int], splits: Any,
              warnings: list[str], checklist: list[str]) -> None:
        checklist.append(f"the target column is {spec.task.target_column!r}")

    def summary(self, choice: TaskChoice, counts: Mapping[str, int]) -> list[str]:
        return [f"buckets:    {', '.join(f'{k} {n:,}' for k, n in counts.items())}"]
