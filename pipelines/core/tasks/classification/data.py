"""Text classification's examples: the spec's text and label columns read from the raw rows, and the blocking
checks on the cleaned rows (labels known and distinct, texts that look like text, class balance, ...)."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.cleaning import cell_text, column_text, dedup_key
from pipelines.core.errors import SourceError
from pipelines.core.quality import (ERROR, WARN, QualityReport, check_def, evaluate_checks, lost_examples_check,
                                    with_row_id)
from pipelines.core.tasks.classification.cleaning import clean
from pipelines.core.tasks.classification.config import LABEL_CONTROL, ClassificationTaskConfig

if TYPE_CHECKING:
    from pipelines.core.sections import SpecView


# Columns a failed check's example rows show (where the checked table has them), in this order.
EXAMPLE_COLUMNS = ("text", "label", "split", "source_file", "source_row")
CLEANED_CHECKS = ("labels_look_like_classes", "labels_are_plain_text", "labels_are_known",
                  "declared_labels_have_rows", "labels_are_distinct", "texts_look_like_text", "cleaning_kept_most_rows",
                  "text_lengths_within_bounds", "texts_are_unique", "row_count_within_bounds", "classes_are_balanced")


SPLITS_CHECKS = ("splits_do_not_overlap", "split_proportions_match_spec", "every_class_in_train_and_test",
                 "validation_and_test_are_not_empty")


DESCRIPTIONS = {
    "labels_look_like_classes": "The label column holds classes, not ids (nearly every label distinct).",
    "labels_are_plain_text": "No label holds a line break, a tab or another control character.",
    "labels_are_known": "Every label is declared in task.labels (or, without them, frequent enough not to be a typo).",
    "text_lengths_within_bounds": "Every text length is within task.min_text_chars and task.max_text_chars.",
    "texts_are_unique": "No normalised text occurs twice (within a split, when the source brings splits).",
    "row_count_within_bounds": "The row count is within quality.min_rows and quality.max_rows.",
    "classes_are_balanced": "Every class has enough rows to learn from (error); none is much smaller than the largest "
                            "(warning).",
    "declared_labels_have_rows": "Every label declared in task.labels has rows.",
    "labels_are_distinct": "No two labels differ only in case, spacing or punctuation.",
    "texts_look_like_text": "The text column holds text, not mostly ids or numbers.",
    "cleaning_kept_most_rows": "Cleaning dropped at most quality.max_lost_fraction of the source's distinct examples.",
    "splits_do_not_overlap": "No normalised text is in two splits.",
    "split_proportions_match_spec": "Split shares are within quality.split_tolerance of the spec.",
    "every_class_in_train_and_test": "Every class has rows in train and in test.",
    "validation_and_test_are_not_empty": "Validation and test have rows.",
}


# -------------------------------------------------------------------------------------- examples, quality
def _require_column(raw: pd.DataFrame, column: str, field_name: str) -> None:
    if column not in raw.columns:
        files = sorted(set(raw["source_file"].astype(str))) if "source_file" in raw.columns else []
        available = [c for c in raw.columns if c not in ("source_file", "source_row", "source_split")]
        raise SourceError(f"has no column {column!r} (named by {field_name}); its columns are {available}",
                          file=", ".join(files) or None, column=column)


def read_label(value: Any) -> str | None:
    """A label cell as the task reads it: bytes decoded as UTF-8, a whole number as written (a column of whole
    numbers with a gap reads as floats: 1.0 is '1'), stripped, and in one Unicode form, NFC, as task.labels is read
    ('Cafe\\u0301' and 'Café' are one class); None when missing or empty. Raises NotText for what is not text."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    text = cell_text(value)
    return None if text is None else unicodedata.normalize("NFC", text.strip()) or None


def select_examples(raw: pd.DataFrame, task: ClassificationTaskConfig) -> pd.DataFrame:
    """Pick the spec's text and label columns and derive the label; keep provenance and source splits."""
    _require_column(raw, task.text_column, "task.text_column")
    _require_column(raw, task.label_column, "task.label_column")
    frame = pd.DataFrame({
        "text": raw[task.text_column].astype(object),
        "label": raw[task.label_column].astype(object),
        "source_file": raw["source_file"].astype(str),
        "source_row": raw["source_row"].astype("int64"),
    })
    if "source_split" in raw.columns:
        frame["source_split"] = raw["source_split"].astype(str)
    for column, field_name in ((task.text_column, "task.text_column"), (task.label_column, "task.label_column")):
        nested = next(((file, row, v) for v, file, row in zip(raw[column], frame["source_file"], frame["source_row"],
                                                               strict=True)
                       if isinstance(v, (dict, list, tuple, np.ndarray))), None)
        if nested is not None:
            raise SourceError(f"holds a JSON {'object' if isinstance(nested[2], dict) else 'list'} "
                              f"({str(nested[2])[:60]}), not a {'text' if column == task.text_column else 'label'} "
                              f"(named by {field_name}); tuneline reads the top-level fields of each record: "
                              "flatten the nested one into a column of its own (e.g. pandas.json_normalize)",
                              file=nested[0], row=int(nested[1]), column=column)
    # Bytes are decoded as UTF-8, never kept as their repr (b'...'); a cell that is not text names its row.
    frame["text"] = column_text(frame["text"], frame["source_file"], frame["source_row"], task.text_column, "a text")
    frame["label"] = column_text(frame["label"], frame["source_file"], frame["source_row"], task.label_column,
                                 "a label", read=read_label)
    if task.label_pattern is not None:
        pattern = re.compile(task.label_pattern)
        derived = []
        for label, file, row in zip(frame["label"], frame["source_file"], frame["source_row"], strict=True):
            if label is None:
                derived.append(None)
                continue
            match = pattern.search(label)
            if match is None or match.group(1) is None:
                raise SourceError(f"label {label!r} does not match task.label_pattern {task.label_pattern!r}",
                                  file=file, row=int(row), column=task.label_column)
            derived.append(match.group(1))
        frame["label"] = derived
    return frame


ID_LIKE = r"^(?:[\W\d_]*|[\x21-\x7e]*\d[\x21-\x7e]*)$"  # no letters, or one ASCII token with a digit: 42, TCK-00123
# A label column holds ids, not classes, when nearly every label is distinct (from IDS_MIN_ROWS rows on): more than
# IDS_DISTINCT_SHARE of the rows, or more than IDS_PATTERN_DISTINCT_SHARE when the labels look like ids (uuids,
# hashes, numbers of 4+ digits such as TCK-10000). Many small classes (banking77: 77 labels in 13,000 rows; 2 or 3
# rows a class) stay far below: those are classes_are_balanced's to report.
IDS_MIN_ROWS, IDS_DISTINCT_SHARE, IDS_PATTERN_DISTINCT_SHARE = 20, 0.9, 0.5
ID_LABEL = re.compile(r"(?:[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}|[0-9a-f]{16,}|\S*\d{4,}\S*)", re.IGNORECASE)


def _ids_table(labels: pd.Series, column: str, declared: tuple[str, ...] | None) -> tuple[pd.DataFrame, float, str]:
    """`labels_look_like_classes`: the label column's distinct values per row (with task.labels, only the undeclared
    ones count), the largest share allowed, and what to fix (naming the column, the counts and examples)."""
    rows = len(labels)
    values = labels if declared is None else labels[~labels.isin(declared)]
    distinct = [str(v) for v in values.drop_duplicates()]
    patterned = bool(distinct) and sum(bool(ID_LABEL.fullmatch(v)) for v in distinct) >= 0.9 * len(distinct)
    table = pd.DataFrame([{"label_column": column, "rows": rows, "distinct_labels": len(distinct),
                           "distinct_share": round(len(distinct) / max(rows, 1), 4)}])
    table = table if rows >= IDS_MIN_ROWS else table.iloc[:0]  # too few rows to tell ids from many small classes
    shown = ", ".join(repr(v if len(v) <= 40 else v[:37] + "...") for v in distinct[:3])
    fix = (f"task.label_column {column!r} holds {len(distinct)} distinct "
           + ("undeclared " if declared is not None else "") + f"values in {rows} rows (e.g. {shown}): "
           "ids (ticket numbers, uuids), not classes a model can learn; point task.label_column at the column that "
           "holds the classes")
    return table, IDS_PATTERN_DISTINCT_SHARE if patterned else IDS_DISTINCT_SHARE, fix


_SPACES, _PUNCTUATION = re.compile(r"\s+"), re.compile(r"[^\w\s]|_")
# How two spellings of a label may differ and still look alike, each with the normalisation that hides it.
LOOK_ALIKE = (("Unicode normalization", lambda x: unicodedata.normalize("NFKC", x)), ("case", str.casefold),
              ("punctuation", lambda x: _PUNCTUATION.sub("", x)), ("spacing", lambda x: _SPACES.sub(" ", x).strip()))


def _loose(label: str, skip: str | None = None, only: str | None = None) -> str:
    for kind, normalise in LOOK_ALIKE:
        if kind != skip and only in (None, kind):
            label = normalise(label)
    return label


def _shown(label: str) -> str:
    """The label quoted, with its combining marks written as escapes: 'Cafe\\u0301' does not look like 'Café'."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.combining(c) else c for c in repr(label))


def look_alike(label: str, declared: tuple[str, ...], rows: int | None = None) -> str | None:
    """Why an undeclared `label` (on `rows` rows) that equals a declared one once Unicode compatibility forms, case,
    punctuation and spacing are ignored is still another label; None when it looks like none of them."""
    for known in declared:
        if label == known or _loose(label) != _loose(known):
            continue
        # A kind tells them apart when ignoring every other kind still leaves them different.
        kinds = [kind for kind, _ in LOOK_ALIKE if _loose(label, skip=kind) != _loose(known, skip=kind)]
        joined = " and ".join(kinds) or " or ".join(
            kind for kind, _ in LOOK_ALIKE if _loose(label, only=kind) == _loose(known, only=kind))
        return (f"{_shown(label)}" + ("" if rows is None else f" ({rows} rows)")
                + f" looks like {_shown(known)} but differs in {joined}")
    return None


def _example_keys(examples: pd.DataFrame) -> pd.Series:
    """One key per distinct example: its normalised text (an empty text is its own example)."""
    return pd.Series([dedup_key(t) if isinstance(t, str) and t.strip() else f"#empty-row-{i}"
                      for i, t in enumerate(examples["text"])], dtype=object)


def validate_cleaned_examples(frame: pd.DataFrame, spec: SpecView,
                              raw_data: pd.DataFrame | None = None) -> QualityReport:
    """Run the cleaned_dataset checks of `spec` on the asset's value (and, given the raw rows, how much cleaning
    lost)."""
    import great_expectations.expectations as gxe

    q, t = spec.quality, spec.task
    rows = with_row_id(frame)
    present = set(rows.columns)
    label_counts = rows["label"].value_counts() if "label" in present else pd.Series(dtype=int)
    if spec.task.labels is not None:  # an undeclared label is a typo for labels_are_known, not a tiny class
        label_counts = label_counts[label_counts.index.isin(spec.task.labels)]
    classes = pd.DataFrame({"label": label_counts.index.astype(str), "rows": label_counts.to_numpy()})
    tables = {"rows": rows, "classes": classes}
    largest = int(label_counts.max()) if len(label_counts) else 0

    checks: list[Any] = []
    labels = rows["label"].astype(object) if "label" in present else pd.Series([], dtype=object)
    tables["ids"], max_share, ids_fix = _ids_table(labels, t.label_column, t.labels)
    checks.append(check_def(
        "labels_look_like_classes",
        f"The label column holds classes, not ids: at most {IDS_DISTINCT_SHARE:g} of its values are distinct "
        f"({IDS_PATTERN_DISTINCT_SHARE:g} when they look like ids: uuids, ticket numbers), from {IDS_MIN_ROWS} "
        "rows on.", ids_fix,
        (gxe.ExpectColumnValuesToBeBetween(column="distinct_share", max_value=max_share), "ids", ERROR)))
    checks.append(check_def(
        "labels_are_plain_text", "No label holds a line break, a tab or another control character: a label is one "
                                 "line of text.",
        "correct the listed labels in the source (each would train as a class of its own; a line break inside a "
        "label often comes from a quoted field that lost its closing quote)",
        (gxe.ExpectColumnValuesToNotMatchRegex(column="label", regex=LABEL_CONTROL), "rows", ERROR)))
    if spec.task.labels is not None:
        unknown = labels[~labels.isin(spec.task.labels)].value_counts()
        hints = [hint for hint in (look_alike(str(v), spec.task.labels, int(n)) for v, n in unknown.items())
                 if hint][:3]
        checks.append(check_def(
            "labels_are_known", f"Every label is one of task.labels {list(spec.task.labels)}.",
            "".join(f"{hint}; " for hint in hints)
            + "correct the misspelt labels in the source, or add the label to task.labels",
            (gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(spec.task.labels)), "rows", ERROR)))
        tables["declared"] = pd.DataFrame({"label": list(spec.task.labels),
                                           "rows": [int(label_counts.get(x, 0)) for x in spec.task.labels]})
        checks.append(check_def(
            "declared_labels_have_rows", "Every label declared in task.labels has rows in the clean data.",
            "add rows of the listed labels, or remove them from task.labels (a model cannot learn a class it "
            "never sees)",
            (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=1), "declared", ERROR)))
    else:
        checks.append(check_def(
            "labels_are_known", f"Every label occurs at least task.min_rows_per_class "
                                f"({t.min_rows_per_class}) times.",
            "correct the labels that occur only a few times (often typos), declare task.labels, or lower "
            "task.min_rows_per_class",
            (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=t.min_rows_per_class), "classes", ERROR)))
    variants = classes.assign(key=[dedup_key(x) for x in classes["label"]]).groupby("key")["label"]
    tables["label_variants"] = pd.DataFrame({"variants": variants.agg(lambda s: " | ".join(sorted(s))),
                                             "count": variants.nunique()}).reset_index(drop=True)
    checks.append(check_def(
        "labels_are_distinct", "No two labels differ only in case, spacing or punctuation ('spam' / 'Spam ').",
        "spell each label one way in the source (the listed variants would train as separate classes), or "
        "declare task.labels",
        (gxe.ExpectColumnValuesToBeBetween(column="count", max_value=1), "label_variants", ERROR)))
    checks.append(check_def(
        "texts_look_like_text",
        f"At most task.max_id_like_fraction ({t.max_id_like_fraction:g}) of the texts look like ids or "
        "numbers.",
        "point task.text_column at the column that holds the text (this one looks like ids or numbers), or "
        "raise task.max_id_like_fraction",
        (gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=ID_LIKE,
                                               mostly=1 - t.max_id_like_fraction), "rows", ERROR)))
    if raw_data is not None:
        selected = select_examples(raw_data, spec.task)
        lost, tables["lost"] = lost_examples_check(_example_keys(selected), _example_keys(frame), q.max_lost_fraction,
                                                   clean(selected, spec.cleaning).dropped)
        checks.append(lost)
    checks.append(check_def(
        "text_lengths_within_bounds",
        f"Every text has between {t.min_text_chars} and {t.max_text_chars} characters.",
        "shorten or drop over-long texts (cleaning.max_chars), or widen task.min/max_text_chars",
        (gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=t.min_text_chars,
                                                 max_value=t.max_text_chars), "rows", ERROR)))
    own_splits = "source_split" in present
    # The source's test split kept whole (cleaning.keep_source_test) may hold the duplicates it came with.
    condition = ({"row_condition": 'source_split != "test"', "condition_parser": "pandas"}
                 if own_splits and spec.cleaning.keep_source_test else {})
    checks.append(check_def(
        "texts_are_unique", "No normalised text occurs twice" + (" within a split" if own_splits else "")
        + (" (the source's test split is kept whole)." if condition else "."),
        "enable cleaning.drop_duplicates, or remove the duplicated rows from the source",
        (gxe.ExpectCompoundColumnsToBeUnique(column_list=["norm_text", "source_split"], **condition) if own_splits
         else gxe.ExpectColumnValuesToBeUnique(column="norm_text"), "rows", ERROR)))
    checks.append(check_def(
        "row_count_within_bounds", f"The clean dataset has between {q.min_rows} and {q.max_rows} rows.",
        "provide more labelled rows (or fewer are being dropped by cleaning: see the asset's metadata), "
        "or change quality.min_rows / quality.max_rows",
        (gxe.ExpectTableRowCountToBeBetween(min_value=q.min_rows, max_value=q.max_rows), "rows", ERROR)))
    warn_at = largest / t.max_imbalance_ratio if largest else 0
    blocking = [(gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=t.min_rows_per_class), "classes",
                 ERROR)]
    if t.imbalance_error_factor is not None:
        blocking.append((gxe.ExpectColumnValuesToBeBetween(
            column="rows", min_value=largest / (t.max_imbalance_ratio * t.imbalance_error_factor)), "classes",
            ERROR))
    checks.append(check_def(
        "classes_are_balanced",
        f"No class is more than task.max_imbalance_ratio ({t.max_imbalance_ratio:g}) times smaller than "
        f"the largest (a warning: imbalance is common), and every class has at least task.min_rows_per_class "
        f"({t.min_rows_per_class}) rows to train and evaluate on (an error)"
        + (f"; over {t.max_imbalance_ratio * t.imbalance_error_factor:g} times is an error too."
           if t.imbalance_error_factor is not None else "."),
        "collect more rows of the small classes, merge them, or lower task.min_rows_per_class",
        *blocking,
        (gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=warn_at), "classes", WARN),
        (gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2), "classes", ERROR)))
    return evaluate_checks("cleaned_dataset", checks, tables, EXAMPLE_COLUMNS)
