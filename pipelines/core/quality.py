"""Data-quality gates: Great Expectations 1.x suites built from the spec, run on an asset's actual value.

Each named check (a true statement such as `splits_do_not_overlap`) is a group of expectations in one suite.
Per-row expectations point at offending rows through a `row_id` column, which maps back to the source file
and row. Table-level facts (class counts, split shares) are validated as small derived tables, so every
threshold and observed value shows up in the GX result.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.core.markdown import markdown_table
from pipelines.core.sections import QualityConfig, SplitsConfig

MAX_EXAMPLES = 20
ERROR, WARN = "ERROR", "WARN"
PROVENANCE_EXAMPLE_COLUMNS = ("split", "source_file", "source_row")  # shown after the task's own columns


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation of a check: what was expected, what was observed, which rows broke it."""

    expectation: str
    kwargs: dict[str, Any]
    success: bool
    observed: Any
    unexpected_count: int | None
    severity: str
    examples: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one named check: passed, or failed with a severity and what to fix."""

    name: str
    description: str
    passed: bool
    severity: str  # ERROR blocks downstream assets; WARN does not
    fix: str
    expectations: tuple[ExpectationOutcome, ...]

    @property
    def failed_expectations(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]

    @property
    def examples(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for outcome in self.failed_expectations:  # two expectations may fail on the same row: shown once
            rows.extend(r for r in outcome.examples if r not in rows)
        return rows[:MAX_EXAMPLES]

    def summary(self) -> str:
        if self.passed:
            return f"{self.name}: passed ({len(self.expectations)} expectations)"
        parts = [f"{e.expectation}({_kwargs_text(e.kwargs)}) observed {_observed_text(e)}"
                 for e in self.failed_expectations]
        return f"{self.name} failed: " + "; ".join(parts) + self._where() + f". To fix: {self.fix}"

    def _where(self) -> str:
        """Where the first offending rows are: their file and row, and the value that broke the rule (the column
        the failed expectation reads, else the row's label, category or split)."""
        shown: list[str] = []
        seen: list[dict[str, Any]] = []
        for outcome in self.failed_expectations:
            column = outcome.kwargs.get("column")
            for row in outcome.examples:
                if row in seen or len(seen) == 3:
                    continue
                seen.append(row)
                if row.get("source_file") is None:  # a row of a derived table (per class, per split): its values
                    shown.append(", ".join(f"{k} {v!r}" for k, v in row.items() if k != "row_id"))
                    continue
                key = column if column in row and row[column] is not None else next(
                    (k for k in ("label", "category", "split") if row.get(k) is not None), None)
                value = "" if key is None else str(row[key])
                value = f"{key} {value if len(value) <= 60 else value[:57] + '...'!r}" if key else ""
                shown.append(f"{row['source_file']} row {row.get('source_row')}" + (f" ({value})" if value else ""))
        return f" — e.g. {'; '.join(shown)}" if shown else ""


@dataclass(frozen=True)
class QualityReport:
    """Every check on one asset value, and the full GX validation result."""

    asset: str
    checks: tuple[CheckOutcome, ...]
    gx_result: dict[str, Any] = field(repr=False)

    def check(self, name: str) -> CheckOutcome:
        return next(c for c in self.checks if c.name == name)


def _json_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def expectations_markdown(outcome: CheckOutcome) -> str:
    """Every expectation of a check with its arguments, what was observed and whether it passed."""
    return markdown_table(["expectation", "threshold / arguments", "observed", "passed", "severity"], [
        [e.expectation, _json_cell(e.kwargs),
         _json_cell(f"{e.unexpected_count} unexpected rows" if e.unexpected_count is not None
                    else "—" if e.observed is None else e.observed),
         "yes" if e.success else "NO", e.severity] for e in outcome.expectations], limit=120)


def examples_markdown(rows: list[dict[str, Any]]) -> str:
    """The offending rows of a failed check, with their source file and row."""
    if not rows:
        return "no offending rows"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return markdown_table(columns, [[_json_cell(row.get(c)) for c in columns] for row in rows], limit=120)


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id",)}
    text = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return text if len(text) < 200 else text[:197] + "..."


def _observed_text(outcome: ExpectationOutcome) -> str:
    if outcome.unexpected_count is not None:
        return f"{outcome.unexpected_count} unexpected row(s)"
    return repr(outcome.observed)


# --------------------------------------------------------------------------------------- GX plumbing
@dataclass
class _Planned:
    check: str
    expectation: Any
    table: str
    severity: str = ERROR


@dataclass
class _CheckDef:
    name: str
    description: str
    fix: str
    planned: list[_Planned] = field(default_factory=list)


def _run_suite(tables: dict[str, pd.DataFrame], planned: list[_Planned], asset: str) -> dict[str, list[dict[str, Any]]]:
    """Validate each derived table, one suite per check; returns GX result dicts per suite.

    One suite per check because GX merges identical expectations within a suite, and two checks may
    share one (e.g. a class-count minimum) while each needs its own result.
    """
    import great_expectations as gx

    results: dict[str, list[dict[str, Any]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # one bar per suite is noise
        source = context.data_sources.add_pandas(f"{asset}_source")
        batches = {}
        for table_name in tables:
            batches[table_name] = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe(
                f"{table_name}_whole")
        groups = dict.fromkeys((p.check, p.table) for p in planned)
        for check, table_name in groups:
            frame = tables[table_name]
            suite = context.suites.add(gx.ExpectationSuite(name=f"{asset}.{check}.{table_name}"))
            for plan in planned:
                if (plan.check, plan.table) == (check, table_name):
                    suite.add_expectation(plan.expectation)
            validation = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{asset}.{check}.{table_name}", data=batches[table_name], suite=suite))
            index = ["row_id"] if "row_id" in frame.columns else [frame.columns[0]]
            result = validation.run(batch_parameters={"dataframe": frame}, result_format={
                "result_format": "COMPLETE", "unexpected_index_column_names": index,
                "partial_unexpected_count": MAX_EXAMPLES, "return_unexpected_index_query": False})
            results[f"{check}.{table_name}"] = result.to_json_dict()["results"]
    return results


def _examples(result: dict[str, Any], frame: pd.DataFrame, columns: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    index_list = (result.get("result") or {}).get("unexpected_index_list") or []
    rows: list[dict[str, Any]] = []
    for item in index_list[:MAX_EXAMPLES]:
        if "row_id" in item and "row_id" in frame.columns:
            row = frame.loc[frame["row_id"] == item["row_id"]].iloc[0]
            rows.append({c: _plain(row[c]) for c in columns if c in frame.columns})
        else:
            rows.append({k: _plain(v) for k, v in item.items()})
    return tuple(rows)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} characters)"
    return value


def _signature(kind: str, kwargs: dict[str, Any]) -> str:
    return kind + json.dumps({k: v for k, v in kwargs.items() if k != "batch_id"}, sort_keys=True, default=str)


def evaluate_checks(asset: str, checks: list[_CheckDef], tables: dict[str, pd.DataFrame],
                    example_columns: tuple[str, ...] = PROVENANCE_EXAMPLE_COLUMNS) -> QualityReport:
    """Run the checks' expectations on their tables; a failed expectation's example rows show `example_columns`
    (the task's: its text, label, response, ...) where the table has them."""
    planned = [p for c in checks for p in c.planned]
    for number, plan in enumerate(planned):
        # GX does not return results in the order expectations were added: tag each one to find it again.
        plan.expectation.meta = {**(plan.expectation.meta or {}), "tuneline_id": number, "check": plan.check,
                                 "severity": plan.severity}
    raw = _run_suite(tables, planned, asset)
    by_id = {r["expectation_config"]["meta"]["tuneline_id"]: r for results in raw.values() for r in results}
    # GX keeps one of two identical expectations in a suite (e.g. warning and error thresholds that coincide
    # on an empty table); the same configuration has the same result, so the twin's result stands for it.
    by_config = {_signature(r["expectation_config"]["type"], r["expectation_config"]["kwargs"]): r
                 for results in raw.values() for r in results}
    by_expectation = {}
    for number, plan in enumerate(planned):
        config = plan.expectation.configuration
        by_expectation[id(plan)] = by_id.get(number) or by_config[_signature(config.type, config.kwargs)]
    outcomes: list[CheckOutcome] = []
    for check in checks:
        expectation_outcomes = []
        for plan in check.planned:
            result = by_expectation[id(plan)]
            info = result.get("result") or {}
            exception = (result.get("exception_info") or {})
            observed = info.get("observed_value")
            if exception.get("raised_exception"):
                observed = f"error: {exception.get('exception_message')}"
            config = result["expectation_config"]
            expectation_outcomes.append(ExpectationOutcome(
                expectation=config["type"],
                kwargs={k: v for k, v in config["kwargs"].items() if k != "batch_id"},
                success=bool(result["success"]),
                observed=observed,
                unexpected_count=info.get("unexpected_count"),
                severity=plan.severity,
                examples=_examples(result, tables[plan.table], example_columns),
            ))
        failed = [e for e in expectation_outcomes if not e.success]
        severity = ERROR if any(e.severity == ERROR for e in failed) or not failed else WARN
        outcomes.append(CheckOutcome(check.name, check.description, not failed, severity, check.fix,
                                     tuple(expectation_outcomes)))
    return QualityReport(asset, tuple(outcomes), {"asset": asset, "results": raw})


def check_def(name: str, description: str, fix: str, *planned: tuple[Any, str, str]) -> _CheckDef:
    """A named check made of (expectation, derived table, severity) triples."""
    c = _CheckDef(name, description, fix)
    c.planned = [_Planned(name, e, table, severity) for e, table, severity in planned]
    return c


def with_row_id(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.reset_index(drop=True).copy()
    out.insert(0, "row_id", range(len(out)))
    return out


# -------------------------------------------------------------------------------------- splits suite
def validate_splits(frame: pd.DataFrame, splits: SplitsConfig, quality: QualityConfig, group_column: str,
                    every_group_in_train_and_test: bool,
                    example_columns: tuple[str, ...] = PROVENANCE_EXAMPLE_COLUMNS) -> QualityReport:
    """Run the splits checks on the asset's value. `group_column` holds the classes (or categories) whose rows
    are tabulated per split; `every_group_in_train_and_test` makes missing ones an error; failed checks show
    `example_columns` of their rows."""
    import great_expectations.expectations as gxe

    q = quality
    rows = with_row_id(frame)
    rows["splits_with_this_text"] = rows.groupby("norm_text")["split"].transform("nunique")
    groups = rows[group_column] if group_column in rows.columns else pd.Series("all", index=rows.index)
    counts = rows["split"].value_counts()
    total = max(len(rows), 1)
    own_splits = "split_origin" in rows.columns and (rows["split_origin"] == "source").any()
    shares = pd.DataFrame([{"split": s, "rows": int(counts.get(s, 0)), "share": counts.get(s, 0) / total,
                            "expected": getattr(splits, s),
                            "deviation": round(abs(counts.get(s, 0) / total - getattr(splits, s)), 9)}
                           for s in ("train", "validation", "test")])
    per_class = pd.crosstab(groups, rows["split"]).reindex(columns=["train", "validation", "test"], fill_value=0)
    classes = pd.DataFrame({"label": per_class.index.astype(str), "train": per_class["train"].to_numpy(),
                            "test": per_class["test"].to_numpy()})
    tables = {"rows": rows, "shares": shares, "classes": classes}

    checks = [check_def(
        "splits_do_not_overlap", "No normalised text is in more than one split (no leakage).",
        "remove the shared rows from one of the source's split files, let tuneline split the data, or set "
        "splits.overlap: drop_from_earlier_splits to keep the later split (test) whole and drop those rows from "
        "the earlier ones",
        (gxe.ExpectColumnValuesToBeBetween(column="splits_with_this_text", max_value=1), "rows", ERROR))]
    if own_splits:
        proportions = check_def(
            "split_proportions_match_spec", "The source brings its own splits; their proportions are kept.",
            "nothing to fix", (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=0), "shares", ERROR))
    else:
        proportions = check_def(
            "split_proportions_match_spec",
            f"Each split's share is within quality.split_tolerance ({q.split_tolerance:g}) of the spec.",
            "with very few rows hash splits are uneven: add data, or raise quality.split_tolerance",
            (gxe.ExpectColumnValuesToBeBetween(column="deviation", max_value=q.split_tolerance), "shares", ERROR))
    checks.append(proportions)
    if every_group_in_train_and_test:
        checks.append(check_def(
            "every_class_in_train_and_test", "Every class has at least one row in train and one in test.",
            "add rows of the missing classes (at least 3 per class), or drop the class from the data",
            (gxe.ExpectColumnValuesToBeBetween(column="train", min_value=1), "classes", ERROR),
            (gxe.ExpectColumnValuesToBeBetween(column="test", min_value=1), "classes", ERROR)))
    needed = [s for s in ("validation", "test") if getattr(splits, s) > 0]
    checks.append(check_def(
        "validation_and_test_are_not_empty", f"The {' and '.join(needed)} split(s) have rows.",
        "add data: the dataset is too small to hold out rows for validation and test",
        (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=1, row_condition=f"split in {needed!r}",
                                           condition_parser="pandas"), "shares", ERROR)))
    return evaluate_checks("splits", checks, tables, example_columns)


def lost_examples_check(raw_keys: pd.Series, kept_keys: pd.Series, max_lost: float,
                        dropped: dict[str, int]) -> tuple[_CheckDef, pd.DataFrame]:
    """`cleaning_kept_most_rows`: the share of the source's distinct examples (by their keys) that cleaning
    dropped stays under `max_lost`; duplicates of a kept example are not losses. `dropped` is cleaning's count of
    rows per reason; the reasons that lose examples are shown beside the share. Returns the check and its table."""
    import great_expectations.expectations as gxe

    raw = set(raw_keys)
    lost = len(raw - set(kept_keys))
    why = ", ".join(f"{why} {n}" for why, n in dropped.items() if n and not why.endswith("duplicate")) or "none"
    # The first column is what a failure's example shows beside the share: why the examples were lost.
    table = pd.DataFrame([{"rows_dropped_by_reason": why, "distinct_in_source": len(raw), "kept": len(raw) - lost,
                           "lost": lost, "share_lost": lost / max(len(raw), 1)}])
    return check_def(
        "cleaning_kept_most_rows",
        f"Cleaning dropped at most quality.max_lost_fraction ({max_lost:g}) of the source's distinct examples "
        "(rows with an empty text, a missing label or response, an empty turn, a malformed message, control "
        "characters, over-long or with conflicting labels; duplicates are not losses).",
        "see rows_dropped_by_reason and the cleaned_dataset's dropped examples: point task.*_column at the right "
        "columns, fill the empty values, raise cleaning.max_chars, or raise quality.max_lost_fraction",
        (gxe.ExpectColumnValuesToBeBetween(column="share_lost", max_value=max_lost), "lost", ERROR)), table


SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "every_class_in_train_and_test",
                 "validation_and_test_are_not_empty")


@dataclass(frozen=True)
class QualitySuite:
    """The blocking checks of one asset: their names and descriptions (shown in the UI before any run), the
    other assets they read, and the function that validates the asset's value.

    `validate(value, **inputs)` receives the checked asset's value and the values of `inputs` by name.
    """

    asset: str
    checks: tuple[str, ...]
    descriptions: dict[str, str]
    validate: Callable[..., QualityReport]
    inputs: tuple[str, ...] = ()
