"""Data-quality gates: Great Expectations 1.x suites built from the spec, run on an asset's actual value.

Each named check (a true statement such as `splits_do_not_overlap`) is a group of expectations in one suite.
Per-row expectations point at offending rows through a `row_id` column, which maps back to the source file
and row. Table-level facts (class counts, split shares) are validated as small derived tables, so every
threshold and observed value shows up in the GX result.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.core.spec import PipelineSpec

MAX_EXAMPLES = 20
ERROR, WARN = "ERROR", "WARN"
_EXAMPLE_COLUMNS = ("text", "label", "response", "roles_problem", "total_tokens", "split", "source_file", "source_row")


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
        for outcome in self.failed_expectations:
            rows.extend(outcome.examples)
        return rows[:MAX_EXAMPLES]

    def summary(self) -> str:
        if self.passed:
            return f"{self.name}: passed ({len(self.expectations)} expectations)"
        parts = [f"{e.expectation}({_kwargs_text(e.kwargs)}) observed {_observed_text(e)}"
                 for e in self.failed_expectations]
        return f"{self.name} failed: " + "; ".join(parts) + f". To fix: {self.fix}"


@dataclass(frozen=True)
class QualityReport:
    """Every check on one asset value, and the full GX validation result."""

    asset: str
    checks: tuple[CheckOutcome, ...]
    gx_result: dict[str, Any] = field(repr=False)

    def check(self, name: str) -> CheckOutcome:
        return next(c for c in self.checks if c.name == name)


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


def _quiet_gx() -> None:
    # GX logs chatty INFO lines and, with analytics on, tries to reach its usage-statistics service; the
    # checks report their results themselves and tuneline runs offline. (Set before GX is first imported.)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run_suite(tables: dict[str, pd.DataFrame], planned: list[_Planned], asset: str) -> dict[str, list[dict[str, Any]]]:
    """Validate each derived table, one suite per check; returns GX result dicts per suite.

    One suite per check because GX merges identical expectations within a suite, and two checks may
    share one (e.g. a class-count minimum) while each needs its own result.
    """
    _quiet_gx()
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


def _examples(result: dict[str, Any], frame: pd.DataFrame) -> tuple[dict[str, Any], ...]:
    index_list = (result.get("result") or {}).get("unexpected_index_list") or []
    rows: list[dict[str, Any]] = []
    for item in index_list[:MAX_EXAMPLES]:
        if "row_id" in item and "row_id" in frame.columns:
            row = frame.loc[frame["row_id"] == item["row_id"]].iloc[0]
            rows.append({c: _plain(row[c]) for c in _EXAMPLE_COLUMNS if c in frame.columns})
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
    import json

    return kind + json.dumps({k: v for k, v in kwargs.items() if k != "batch_id"}, sort_keys=True, default=str)


def _evaluate(asset: str, checks: list[_CheckDef], tables: dict[str, pd.DataFrame]) -> QualityReport:
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
                examples=_examples(result, tables[plan.table]),
            ))
        failed = [e for e in expectation_outcomes if not e.success]
        severity = ERROR if any(e.severity == ERROR for e in failed) or not failed else WARN
        outcomes.append(CheckOutcome(check.name, check.description, not failed, severity, check.fix,
                                     tuple(expectation_outcomes)))
    return QualityReport(asset, tuple(outcomes), {"asset": asset, "results": raw})


def _check_def(name: str, description: str, fix: str, *planned: tuple[Any, str, str]) -> _CheckDef:
    """A named check made of (expectation, derived table, severity) triples."""
    c = _CheckDef(name, description, fix)
    c.planned = [_Planned(name, e, table, severity) for e, table, severity in planned]
    return c


def _with_row_id(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.reset_index(drop=True).copy()
    out.insert(0, "row_id", range(len(out)))
    return out


# ----------------------------------------------------------------------------- cleaned_dataset suite
CLEANED_CHECKS = ("cleaned_dataset_has_required_columns", "texts_are_present", "labels_are_known",
                  "text_lengths_within_bounds", "texts_are_unique", "row_count_within_bounds", "classes_are_balanced")
SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "every_class_in_train_and_test",
                 "validation_and_test_are_not_empty")
CHAT_CLEANED_CHECKS = ("cleaned_dataset_has_required_columns", "responses_are_present", "roles_alternate",
                       "examples_are_unique", "row_count_within_bounds")
CHAT_SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "validation_and_test_are_not_empty")
RENDERED_CHECKS = ("rendered_lengths_within_max_length", "prompt_tokens_carry_no_loss")


def cleaned_checks_for(spec: PipelineSpec) -> tuple[str, ...]:
    return CHAT_CLEANED_CHECKS if spec.task.type == "instruction_tuning" else CLEANED_CHECKS


def splits_checks_for(spec: PipelineSpec) -> tuple[str, ...]:
    return CHAT_SPLITS_CHECKS if spec.task.type == "instruction_tuning" else SPLITS_CHECKS


def validate_cleaned_dataset(frame: pd.DataFrame, spec: PipelineSpec) -> QualityReport:
    """Run the cleaned_dataset checks of `spec` on the asset's value."""
    import great_expectations.expectations as gxe

    if spec.task.type == "instruction_tuning":
        return validate_cleaned_conversations(frame, spec)
    q = spec.quality
    rows = _with_row_id(frame)
    present = set(rows.columns)
    label_counts = rows["label"].value_counts() if "label" in present else pd.Series(dtype=int)
    classes = pd.DataFrame({"label": label_counts.index.astype(str), "rows": label_counts.to_numpy()})
    tables = {"rows": rows, "classes": classes}
    largest = int(label_counts.max()) if len(label_counts) else 0

    checks = [_check_def(
        "cleaned_dataset_has_required_columns", "The text and label columns exist and hold strings.",
        "make task.text_column and task.label_column name text columns of the source",
        *[(gxe.ExpectColumnToExist(column=c), "rows", ERROR) for c in ("text", "label")],
        # pandas 3 stores text as its `str` dtype; GX's type-list expectation does not recognise it, this one does.
        *[(gxe.ExpectColumnValuesToBeOfType(column=c, type_="str"), "rows", ERROR)
          for c in ("text", "label") if c in present])]
    if {"text", "label"} <= present:
        checks.append(_check_def(
            "texts_are_present", "No text or label is null or blank.",
            "remove or fill the rows with an empty text or label",
            (gxe.ExpectColumnValuesToNotBeNull(column="text"), "rows", ERROR),
            (gxe.ExpectColumnValuesToNotBeNull(column="label"), "rows", ERROR),
            (gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"), "rows", ERROR)))
        if spec.task.labels is not None:
            checks.append(_check_def(
                "labels_are_known", f"Every label is one of task.labels {list(spec.task.labels)}.",
                "correct the misspelt labels in the source, or add the label to task.labels",
                (gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(spec.task.labels)), "rows", ERROR)))
        else:
            checks.append(_check_def(
                "labels_are_known", f"Every label occurs at least quality.min_rows_per_class "
                                    f"({q.min_rows_per_class}) times.",
                "correct the labels that occur only a few times (often typos), declare task.labels, or lower "
                "quality.min_rows_per_class",
                (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=q.min_rows_per_class), "classes", ERROR)))
        checks.append(_check_def(
            "text_lengths_within_bounds",
            f"Every text has between {q.min_text_chars} and {q.max_text_chars} characters.",
            "shorten or drop over-long texts (cleaning.max_chars), or widen quality.min/max_text_chars",
            (gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=q.min_text_chars,
                                                     max_value=q.max_text_chars), "rows", ERROR)))
        unique_within = ["norm_text", "source_split"] if "source_split" in present else ["norm_text"]
        checks.append(_check_def(
            "texts_are_unique", "No normalised text occurs twice" + (" within a split." if len(unique_within) > 1 else "."),
            "enable cleaning.drop_duplicates, or remove the duplicated rows from the source",
            (gxe.ExpectCompoundColumnsToBeUnique(column_list=unique_within) if len(unique_within) > 1
             else gxe.ExpectColumnValuesToBeUnique(column="norm_text"), "rows", ERROR)))
        checks.append(_check_def(
            "row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
            "provide more labelled rows (or fewer are being dropped by cleaning: see the asset's metadata), "
            "or change quality.min_rows / quality.max_rows",
            (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)))
        warn_at = largest / q.max_imbalance_ratio if largest else 0
        error_at = largest / (q.max_imbalance_ratio * q.imbalance_error_factor) if largest else 0
        checks.append(_check_def(
            "classes_are_balanced",
            f"No class is more than quality.max_imbalance_ratio ({q.max_imbalance_ratio:g}) times smaller than "
            f"the largest (warning), or {q.max_imbalance_ratio * q.imbalance_error_factor:g} times (error).",
            "collect more rows of the small classes, merge them, or raise quality.max_imbalance_ratio",
            (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=error_at), "classes", ERROR),
            (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=warn_at), "classes", WARN),
            (gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2), "classes", ERROR)))
    return _evaluate("cleaned_dataset", checks, tables)


# -------------------------------------------------------------------------------------- splits suite
def validate_splits(frame: pd.DataFrame, spec: PipelineSpec) -> QualityReport:
    """Run the splits checks of `spec` on the asset's value."""
    import great_expectations.expectations as gxe

    q = spec.quality
    rows = _with_row_id(frame)
    rows["splits_with_this_text"] = rows.groupby("norm_text")["split"].transform("nunique")
    if "label" not in rows.columns:  # instruction tuning: categories play the part of classes in the tables
        rows["label"] = rows["category"] if "category" in rows.columns else "all"
    counts = rows["split"].value_counts()
    total = max(len(rows), 1)
    own_splits = "split_origin" in rows.columns and (rows["split_origin"] == "source").any()
    shares = pd.DataFrame([{"split": s, "rows": int(counts.get(s, 0)), "share": counts.get(s, 0) / total,
                            "expected": getattr(spec.splits, s),
                            "deviation": abs(counts.get(s, 0) / total - getattr(spec.splits, s))}
                           for s in ("train", "validation", "test")])
    per_class = pd.crosstab(rows["label"], rows["split"]).reindex(columns=["train", "validation", "test"],
                                                                 fill_value=0)
    classes = pd.DataFrame({"label": per_class.index.astype(str), "train": per_class["train"].to_numpy(),
                            "test": per_class["test"].to_numpy()})
    tables = {"rows": rows, "shares": shares, "classes": classes}

    checks = [_check_def(
        "splits_do_not_overlap", "No normalised text is in more than one split (no leakage).",
        "remove the shared rows from one of the source's split files (or let tuneline split the data)",
        (gxe.ExpectColumnValuesToBeBetween(column="splits_with_this_text", max_value=1), "rows", ERROR))]
    if own_splits:
        proportions = _check_def(
            "split_proportions_match_spec", "The source brings its own splits; their proportions are kept.",
            "nothing to fix", (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=0), "shares", ERROR))
    else:
        proportions = _check_def(
            "split_proportions_match_spec",
            f"Each split's share is within quality.split_tolerance ({q.split_tolerance:g}) of the spec.",
            "with very few rows hash splits are uneven: add data, or raise quality.split_tolerance",
            (gxe.ExpectColumnValuesToBeBetween(column="deviation", max_value=q.split_tolerance), "shares", ERROR))
    checks.append(proportions)
    checks.append(_check_def(
        "every_class_in_train_and_test", "Every class has at least one row in train and one in test.",
        "add rows of the missing classes (at least 3 per class), or drop the class from the data",
        (gxe.ExpectColumnValuesToBeBetween(column="train", min_value=1), "classes", ERROR),
        (gxe.ExpectColumnValuesToBeBetween(column="test", min_value=1), "classes", ERROR)))
    if spec.task.type == "instruction_tuning":  # categories are reported, not required in every split
        checks = [c for c in checks if c.name != "every_class_in_train_and_test"]
    needed = [s for s in ("validation", "test") if getattr(spec.splits, s) > 0]
    checks.append(_check_def(
        "validation_and_test_are_not_empty", f"The {' and '.join(needed)} split(s) have rows.",
        "add data: the dataset is too small to hold out rows for validation and test",
        (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=1, row_condition=f"split in {needed!r}",
                                           condition_parser="pandas"), "shares", ERROR)))
    return _evaluate("splits", checks, tables)


QualityFn = Callable[[pd.DataFrame, PipelineSpec], QualityReport]


# ------------------------------------------------------------------------------ instruction tuning suites
def validate_cleaned_conversations(frame: pd.DataFrame, spec: PipelineSpec) -> QualityReport:
    """The cleaned_dataset checks of an instruction-tuning spec: columns, responses, roles, duplicates, size."""
    import json

    import great_expectations.expectations as gxe

    from pipelines.core.chat import role_problem

    q = spec.quality
    rows = _with_row_id(frame)
    present = set(rows.columns)
    required = ("messages", "text", "response")
    checks = [_check_def(
        "cleaned_dataset_has_required_columns", "The messages, instruction text and response columns exist.",
        "give the source instruction and response columns (task.instruction_column / task.response_column) or "
        "a messages column (task.messages_column)",
        *[(gxe.ExpectColumnToExist(column=c), "rows", ERROR) for c in required],
        *[(gxe.ExpectColumnValuesToBeOfType(column=c, type_="str"), "rows", ERROR) for c in required if c in present])]
    if set(required) <= present:
        def problem(value: str) -> str | None:
            try:
                return role_problem(json.loads(value))
            except (TypeError, ValueError) as exc:
                return f"messages are not valid JSON: {exc}"

        rows["roles_problem"] = pd.Series([problem(v) for v in rows["messages"]], dtype=object)
        checks.append(_check_def(
            "responses_are_present", "No instruction or response is null or blank.",
            "remove or fill the rows with an empty instruction or response",
            (gxe.ExpectColumnValuesToNotBeNull(column="text"), "rows", ERROR),
            (gxe.ExpectColumnValuesToNotBeNull(column="response"), "rows", ERROR),
            (gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"), "rows", ERROR),
            (gxe.ExpectColumnValuesToNotMatchRegex(column="response", regex=r"^\s*$"), "rows", ERROR)))
        checks.append(_check_def(
            "roles_alternate", "Every conversation is an optional system message, then user and assistant turns "
                               "alternating, ending with the assistant's response.",
            "fix the roles of the listed conversations (roles_problem says what is wrong); roles are system, user "
            "and assistant",
            (gxe.ExpectColumnValuesToBeNull(column="roles_problem"), "rows", ERROR)))
        checks.append(_check_def(
            "examples_are_unique", "No instruction occurs twice with the same response.",
            "enable cleaning.drop_duplicates, or remove the duplicated rows from the source",
            (gxe.ExpectCompoundColumnsToBeUnique(column_list=["norm_text", "norm_response"]), "rows", ERROR)))
        checks.append(_check_def(
            "row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
            "provide more conversations (or fewer are being dropped by cleaning: see the asset's metadata), or "
            "change quality.min_rows / quality.max_rows",
            (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)))
    return _evaluate("cleaned_dataset", checks, tables={"rows": rows})


def validate_rendered_dataset(frame: pd.DataFrame, spec: PipelineSpec, rows_in: int) -> QualityReport:
    """The rendered_dataset checks: lengths within training.max_length, few examples lost to it, and the loss
    mask covering exactly the response tokens. `rows_in` is the number of rows of the splits asset."""
    import great_expectations.expectations as gxe

    max_length = spec.training.max_length
    rows = _with_row_id(frame)
    dropped = max(rows_in - len(rows), 0)
    truncated = int(rows["truncated"].sum()) if "truncated" in rows.columns else 0
    lost = pd.DataFrame([{"rows_in": rows_in, "dropped": dropped, "truncated": truncated,
                          "share": (dropped + truncated) / max(rows_in, 1)}])

    def mask_ok(mask: Any, prompt_tokens: int, completion_tokens: int) -> bool:
        mask = list(mask)
        return completion_tokens >= 1 and mask == [0] * prompt_tokens + [1] * completion_tokens

    rows["loss_mask_matches_response"] = [
        mask_ok(m, int(p), int(c)) for m, p, c in zip(rows["completion_mask"], rows["prompt_tokens"],
                                                     rows["completion_tokens"], strict=True)]
    checks = [
        _check_def(
            "rendered_lengths_within_max_length",
            f"Every rendered example has at most training.max_length ({max_length}) tokens, and at most "
            f"quality.max_overlength_fraction ({spec.quality.max_overlength_fraction:g}) of the examples were "
            "dropped or truncated to get there.",
            "raise training.max_length (the per-split table shows how many were lost), shorten the long "
            "conversations, or raise quality.max_overlength_fraction",
            (gxe.ExpectColumnValuesToBeBetween(column="total_tokens", min_value=1, max_value=max_length), "rows", ERROR),
            (gxe.ExpectColumnValuesToBeBetween(column="share", max_value=spec.quality.max_overlength_fraction),
             "lost", ERROR)),
        _check_def(
            "prompt_tokens_carry_no_loss",
            "Every example has response tokens, and the loss mask is 0 on every prompt token and 1 on every "
            "response token.",
            "an example whose response is empty after rendering cannot be learned from: fix the data or the "
            "chat template",
            (gxe.ExpectColumnValuesToBeBetween(column="completion_tokens", min_value=1), "rows", ERROR),
            (gxe.ExpectColumnValuesToBeInSet(column="loss_mask_matches_response", value_set=[True]), "rows", ERROR)),
    ]
    return _evaluate("rendered_dataset", checks, tables={"rows": rows, "lost": lost})
